//! Runs a [`Sender`] and a [`Receiver`] against each other in one thread, frames passed
//! in memory and compression jobs run inline. A real pairing, not a fake: tests, the
//! benchmark and single-host tools use it; the node's driver does the same over AMST
//! streams with jobs on its worker threads.

use crate::error::{DecodeError, EncodeError};
use crate::receiver::{Receiver, ReceiverEvent};
use crate::sender::{Sender, SenderOutput};

/// Why a loopback run failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoopbackError {
    /// The sender failed.
    #[error("sender: {0}")]
    Encode(#[from] EncodeError),
    /// The receiver rejected a frame.
    #[error("receiver: {0}")]
    Decode(#[from] DecodeError),
}

/// Counts of what crossed the in-memory wire.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    /// Frame bytes sender → receiver.
    pub forward_bytes: u64,
    /// Frame bytes receiver → sender.
    pub back_bytes: u64,
}

/// Drains the sender until it has nothing more to do, delivering frames to the receiver
/// and replies back, and hands every decoded event (pages, stream bytes, finished) to
/// `sink`.
pub fn pump(
    sender: &mut Sender,
    receiver: &mut Receiver,
    wire: &mut Wire,
    sink: &mut dyn FnMut(ReceiverEvent),
) -> Result<(), LoopbackError> {
    while let Some(o) = sender.poll_output() {
        match o {
            SenderOutput::Compress(job) => sender.handle_compressed(job.run()?)?,
            SenderOutput::Send(frame) => {
                wire.forward_bytes += frame.len() as u64;
                for ev in receiver.handle_frame(&frame)? {
                    match ev {
                        ReceiverEvent::Reply(r) => {
                            wire.back_bytes += r.len() as u64;
                            sender.handle_reply(&r)?;
                        }
                        other => sink(other),
                    }
                }
            }
        }
    }
    Ok(())
}
