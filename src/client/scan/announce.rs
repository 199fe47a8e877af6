//! The announcer: files announced within the server's limit of files in
//! flight, their begins many to a message; and what it holds when a stream
//! breaks.

use std::{sync::Arc, time::Instant};

use parking_lot::Mutex;
use tokio::sync::{Semaphore, mpsc};

use super::{
    Pending, PendingFile, ResultSink, failed_outcome, file_begin,
    prepare::{Ready, Sources, Unreadable},
    send::Upload,
    unreadable,
};
use crate::{
    client::{ClientError, FileSource},
    engine::ScanOutcome,
    proto::{FileBegin, FileRequest, ScanRequest},
    verdict::{FailReason, Verdict},
};

/// The most begins sent in one message. Begins ready together (files
/// prepared beforehand, a server quick to answer) go out together: fewer
/// messages mean fewer wake-ups and socket writes on both sides.
const MAX_BEGINS: usize = 256;

/// Where the announcer leaves the files it had not handed on (to the
/// server, or to `on_result`) when it stops early: with the pending ones,
/// they are failed, so that every file gets its one outcome.
pub(super) type Unannounced = Arc<Mutex<Left>>;

/// Files without an outcome, to announce: those held (prepared already,
/// announced on a stream that broke, say), then the rest.
#[derive(Default)]
pub(super) struct Left {
    pub(super) files: Vec<PendingFile>,
    pub(super) rest: Option<Sources>,
}

impl Left {
    /// Fails every file for `detail`, and returns once each has its
    /// outcome.
    pub(super) async fn fail_all(self, detail: &str, on_result: &impl ResultSink) {
        for file in self.files {
            let verdict = Verdict::failed(FailReason::Engine, detail);
            on_result.room().await;
            on_result.put(file.source.path(), file.failed(verdict));
        }
        if let Some(rest) = self.rest {
            rest.fail_all(on_result, || unanswered(detail)).await;
        }
    }
}

/// The outcome of a file never sent to the server, failed for `detail`.
fn unanswered(detail: &str) -> ScanOutcome {
    failed_outcome(Verdict::failed(FailReason::Engine, detail), 0, None)
}

/// The files the announcer holds: those held from an earlier stream and
/// those still to come, the one taken last, and those whose begins wait to
/// go. However it stops (done, failed, or aborted at any await, or before
/// it first ran), what it still holds goes to `unannounced`.
pub(super) struct Held {
    again: std::vec::IntoIter<PendingFile>,
    /// `None` only once dropped.
    rest: Option<Sources>,
    current: Option<PendingFile>,
    ready: Vec<(FileBegin, PendingFile)>,
    unannounced: Unannounced,
}

impl Held {
    /// Holds the files `left`; what is left of them when it goes, to
    /// `unannounced`.
    pub(super) fn new(left: Left, unannounced: Unannounced) -> Held {
        Held {
            again: left.files.into_iter(),
            rest: left.rest,
            current: None,
            ready: Vec::new(),
            unannounced,
        }
    }

    /// How many files are left, counting the one taken last.
    fn left(&self) -> usize {
        let rest = self.rest.as_ref().map_or(0, Sources::left);
        rest.saturating_add(self.again.len() + 1)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut left = self.unannounced.lock();
        left.files.extend(self.current.take());
        left.files
            .extend(self.ready.drain(..).map(|(_, file)| file));
        left.files.extend(self.again.by_ref());
        left.rest = self.rest.take();
    }
}

/// Announces files, keeping at most the server's limit in flight.
pub(super) struct Announcer {
    pub(super) session_id: String,
    /// The server's limit: a larger file is announced without its content,
    /// to be refused.
    pub(super) max_file_size: u64,
    pub(super) pending: Pending,
    pub(super) requests: mpsc::Sender<ScanRequest>,
    /// Files that go with their content, to the content sender.
    pub(super) uploads: mpsc::UnboundedSender<Upload>,
}

impl Announcer {
    /// Announces each file: by digest (its begin goes out with others in
    /// one message, as soon as the announcer would otherwise wait, for a
    /// place in flight or for the preparer), or with its content (its
    /// begin goes to the content sender, to go out with the content).
    pub(super) async fn run<F>(
        self,
        mut held: Held,
        mut in_flight: Window,
        on_result: Arc<F>,
    ) -> Result<(), ClientError>
    where
        F: ResultSink,
    {
        while self.next(&mut held, &*on_result).await? {
            if !in_flight.try_take() {
                self.send(&mut held.ready).await?;
                in_flight.take(held.left()).await;
            }
            let file = held.current.take().expect("held until handed on");
            let begin = file_begin(&self.session_id, &file.source, file.size, file.digest);
            if file.digest.is_some() || file.size > self.max_file_size {
                held.ready.push((begin, file));
                if held.ready.len() == MAX_BEGINS {
                    self.send(&mut held.ready).await?;
                }
            } else {
                self.upload(begin, file);
            }
        }
        self.send(&mut held.ready).await
    }

    /// Takes the next file into `held.current`, with its size and digest;
    /// `false` once every file was taken. A local file comes from the
    /// preparer (the `ready` begins go first if it is behind); one it
    /// could not read fails at once, and the next is taken.
    async fn next(
        &self,
        held: &mut Held,
        on_result: &impl ResultSink,
    ) -> Result<bool, ClientError> {
        if let Some(file) = held.again.next() {
            held.current = Some(file);
            return Ok(true);
        }
        loop {
            // Before a file is taken, not between taking it and failing it:
            // the announcer may be aborted at any await.
            on_result.room().await;
            let Some(rest) = held.rest.as_mut() else {
                return Ok(false);
            };
            let (source, ready) = match rest {
                Sources::Prepared(files) => {
                    let Some(file) = files.next() else {
                        return Ok(false);
                    };
                    let ready = Ready {
                        size: file.content.len() as u64,
                        digest: Some(file.digest),
                    };
                    (FileSource::Prepared(file), Some(Ok(ready)))
                }
                Sources::Local { prepared, .. } => {
                    let file = match prepared.try_recv() {
                        Ok(file) => file,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            // The begins held go first, ended or not.
                            self.send(&mut held.ready).await?;
                            return rest.ended().map(|()| false);
                        }
                        Err(mpsc::error::TryRecvError::Empty) => {
                            self.send(&mut held.ready).await?;
                            match prepared.recv().await {
                                Some(file) => file,
                                None => return rest.ended().map(|()| false),
                            }
                        }
                    };
                    (FileSource::Path(file.local), file.ready)
                }
            };
            // Files go unread only once the scan has broken, and the
            // announcer has stopped by then; were one taken, it would
            // fail, not pass.
            let not_read = || Err(std::io::Error::other("not read: the scan had broken").into());
            match ready.unwrap_or_else(not_read) {
                Ok(ready) => {
                    held.current = Some(PendingFile::new(source, ready));
                    return Ok(true);
                }
                Err(Unreadable { err, size }) => {
                    let outcome = failed_outcome(unreadable(&err), size, None);
                    on_result.put(source.path(), outcome);
                }
            }
        }
    }

    /// Sends the `ready` begins in one message, their files pending first
    /// (the answers may come at once), each begin with its file's id.
    async fn send(&self, ready: &mut Vec<(FileBegin, PendingFile)>) -> Result<(), ClientError> {
        if ready.is_empty() {
            return Ok(());
        }
        let message = {
            // The begins go together: one reading of the clock for all.
            let now = Instant::now();
            let mut pending = self.pending.lock();
            let begins = ready.drain(..).map(|(mut begin, mut file)| {
                file.announced(now);
                begin.file_id = pending.insert(file);
                FileRequest::from(begin)
            });
            ScanRequest {
                requests: begins.collect(),
            }
        };
        self.requests
            .send(message)
            .await
            .map_err(|_| ClientError::Protocol("the scan stream closed".into()))
    }

    /// Hands a file that goes with its content to the content sender.
    fn upload(&self, begin: FileBegin, mut file: PendingFile) {
        file.announced(Instant::now());
        let upload = self.pending.lock().insert_upload(begin, file);
        let _ = self.uploads.send(upload);
    }
}

/// The server's limit of files in flight, as places. The announcer takes
/// a place for each file it announces; the scan gives places back as
/// files are answered, for a whole reply message at once. Once all are
/// taken, they are taken back a group at a time (three quarters of the
/// limit): for files hashed beforehand (`lightagent bench`), verdicts
/// coming in a few at a time then make one message of begins per group,
/// not one per reply. Each message costs a socket write and a wake-up on
/// both ends, which a storm of many agents multiplies: with a quarter of
/// the limit, a 50-agent storm wrote a quarter more messages. (Begins
/// ready also go when the announcer waits for the preparer.)
pub(super) struct Window {
    pub(super) places: Arc<Semaphore>,
    group: usize,
    /// Places taken and not used yet.
    spare: usize,
}

impl Window {
    pub(super) fn new(limit: usize) -> Self {
        Window {
            places: Arc::new(Semaphore::new(limit)),
            group: (limit * 3 / 4).max(1),
            spare: 0,
        }
    }

    /// Takes a place, if one is free now.
    fn try_take(&mut self) -> bool {
        if self.spare == 0 {
            let Ok(place) = self.places.try_acquire() else {
                return false;
            };
            place.forget();
            self.spare = 1;
        }
        self.spare -= 1;
        true
    }

    /// Takes a place, once a group of them is free (fewer when fewer than
    /// a group of files are left to announce).
    async fn take(&mut self, files_left: usize) {
        let group = self.group.min(files_left).max(1);
        let places = self.places.acquire_many(group as u32).await;
        places.expect("never closed").forget();
        self.spare += group - 1;
    }
}
