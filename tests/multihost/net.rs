//! Three fake hosts for one test: network namespaces A, B and C on a bridge in A (10.231.N.1-3/24), and an
//! sshd inside B and C (Debian's openssh-server, a generated host key, one authorized key made by the
//! test). Names carry the test's pid and a counter, so parallel runs never meet. [`Hosts`] removes all of
//! it on drop, also on panic: every process left inside B or C (the sshds and whatever they started)
//! is killed by pid, then the namespaces are deleted (which removes their links too).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::harness::wait_until;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Hosts {
    /// Namespace names of A, B, C.
    pub ns: [String; 3],
    /// Their addresses.
    pub ip: [String; 3],
    /// The ssh key the master logs in with.
    pub identity: PathBuf,
    sshd: Vec<Child>,
}

/// Why this machine cannot run the test, if it cannot.
pub fn unavailable() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref().unwrap_or("") != "0" {
        return Some("not root (ip netns needs root)".into());
    }
    for tool in ["/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/ssh-keygen"] {
        if !Path::new(tool).exists() {
            return Some(format!("{tool} is missing (openssh-server, openssh-client)"));
        }
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        _ => Some("`ip netns` does not work here (iproute2)".into()),
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Hosts {
    pub fn new(dir: &Path) -> Hosts {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("pmh{}x{n}", std::process::id());
        let ns = ["a", "b", "c"].map(|h| format!("{tag}{h}"));
        let net = (std::process::id() + n) % 250 + 1;
        let ip = [1, 2, 3].map(|i| format!("10.231.{net}.{i}"));
        let identity = dir.join("id");
        let mut hosts = Hosts { ns: ns.clone(), ip: ip.clone(), identity: identity.clone(), sshd: Vec::new() };
        for name in &ns {
            run(&["ip", "netns", "add", name]);
            run(&["ip", "-n", name, "link", "set", "lo", "up"]);
        }
        let a = &ns[0];
        run(&["ip", "-n", a, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", a, "addr", "add", &format!("{}/24", ip[0]), "dev", "br0"]);
        run(&["ip", "-n", a, "link", "set", "br0", "up"]);
        for (i, name) in ns.iter().enumerate().skip(1) {
            let v = format!("v{i}");
            run(&["ip", "-n", a, "link", "add", &v, "type", "veth", "peer", "name", "eth0", "netns", name]);
            run(&["ip", "-n", a, "link", "set", &v, "master", "br0", "up"]);
            run(&["ip", "-n", name, "addr", "add", &format!("{}/24", ip[i]), "dev", "eth0"]);
            run(&["ip", "-n", name, "link", "set", "eth0", "up"]);
        }
        let key = |p: &Path| run(&["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", &p.to_string_lossy()]);
        key(&identity);
        std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).expect("authorized_keys");
        // Debian's sshd wants its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        for i in 1..3 {
            let hk = dir.join(format!("hostkey{i}"));
            key(&hk);
            let cfg = dir.join(format!("sshd{i}.conf"));
            let text = format!(
                "ListenAddress {}\nPort 22\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
                 LogLevel ERROR\n",
                ip[i],
                hk.display(),
                dir.join("authorized_keys").display()
            );
            std::fs::write(&cfg, text).expect("sshd config");
            let log = std::fs::File::create(dir.join(format!("sshd{i}.log"))).expect("sshd log");
            let child = Command::new("ip")
                .args(["netns", "exec", &ns[i], "/usr/sbin/sshd", "-D", "-e", "-f"])
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("sshd");
            hosts.sshd.push(child);
        }
        for name in &ns[1..] {
            wait_until(Duration::from_secs(10), "sshd listening", || {
                let ss = Command::new("ip").args(["netns", "exec", name, "ss", "-ltn"]).output().ok()?;
                String::from_utf8_lossy(&ss.stdout).contains(":22 ").then_some(())
            });
        }
        hosts
    }

    /// Enters A's network namespace on this thread: the master, the CLI and the test's clients run there.
    pub fn enter_a(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.ns[0])).expect("open netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }

    /// Whether `pid` lives in host `i`'s network namespace.
    pub fn pid_in(&self, pid: u32, i: usize) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(p), Ok(n)) = (std::fs::metadata(format!("/proc/{pid}/ns/net")), std::fs::metadata(self.ns_path(i)))
        else {
            return false;
        };
        p.ino() == n.ino() && p.dev() == n.dev()
    }

    fn ns_path(&self, i: usize) -> String {
        format!("/run/netns/{}", self.ns[i])
    }

    /// Every pid inside host `i`'s namespace.
    pub fn pids(&self, i: usize) -> Vec<u32> {
        let out = Command::new("ip").args(["netns", "pids", &self.ns[i]]).output().expect("ip netns pids");
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
    }

    /// The `pomelo-rs worker` processes inside host `i`'s namespace.
    pub fn workers(&self, i: usize) -> Vec<u32> {
        self.pids(i)
            .into_iter()
            .filter(|p| pomelo_master::procstat::cmdline(*p).get(1).is_some_and(|a| a == "worker"))
            .collect()
    }

    /// Takes host `i`'s link to the bridge down or up.
    pub fn link(&self, i: usize, up: bool) {
        run(&["ip", "-n", &self.ns[0], "link", "set", &format!("v{i}"), if up { "up" } else { "down" }]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for i in 1..3 {
            for pid in self.pids(i) {
                crate::harness::signal(pid, libc_sigkill());
            }
        }
        for c in &mut self.sshd {
            let _ = c.kill();
            let _ = c.wait();
        }
        for name in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn libc_sigkill() -> i32 {
    nix::sys::signal::Signal::SIGKILL as i32
}
