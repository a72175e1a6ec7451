//! What each server type runs, given its bound listeners.
//!
//! Until the protocol and chat issues land, every role holds its listeners open and accepts and
//! closes connections, so it is a real process with real ports for supervision tests.

use crate::control::StatsSource;
use crate::runtime::RoleContext;

pub async fn start(ctx: RoleContext) -> anyhow::Result<Vec<StatsSource>> {
    for listener in [ctx.rpc, ctx.client].into_iter().flatten() {
        let stop = ctx.shutdown.clone();
        ctx.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => drop(r),
                }
            }
        });
    }
    Ok(Vec::new())
}
