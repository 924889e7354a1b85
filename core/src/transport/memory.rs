//! An in-memory transport: two repos in one process connected by channels,
//! through the same connection driver real sockets use. For tests and for
//! embedding two peers in one app.

use futures::channel::mpsc;
use futures::StreamExt;
use tokio::task::JoinHandle;

use super::{drive, Incoming, Outgoing};
use crate::engine::Direction;
use crate::runtime::Repo;

/// A live in-memory link; dropping it disconnects both sides.
#[derive(Debug)]
pub struct Link {
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Link {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Connects `dialer` to `listener` (the dialer sends `join`).
pub fn connect(dialer: &Repo, listener: &Repo) -> Link {
    let (a_tx, a_rx) = mpsc::unbounded::<Outgoing>();
    let (b_tx, b_rx) = mpsc::unbounded::<Outgoing>();
    let side = |repo: Repo,
                direction,
                rx: mpsc::UnboundedReceiver<Outgoing>,
                tx: mpsc::UnboundedSender<Outgoing>| {
        tokio::spawn(async move {
            // What one side writes, the other reads.
            let stream = rx.map(|frame| match frame {
                Outgoing::Binary(bytes) => Incoming::Binary(bytes),
                Outgoing::Ping => Incoming::Alive,
                Outgoing::Close(..) => Incoming::Close,
            });
            let _ = drive(
                &repo,
                direction,
                Some("in-memory".into()),
                crate::engine::Grant::everything().into(),
                stream,
                tx,
                None,
            )
            .await;
        })
    };
    Link {
        tasks: [
            side(dialer.clone(), Direction::Outgoing, b_rx, a_tx),
            side(listener.clone(), Direction::Incoming, a_rx, b_tx),
        ],
    }
}
