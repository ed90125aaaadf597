//! argon2id on a bounded pool of worker threads, never on the async reactor.
//!
//! Hashing costs tens of milliseconds of one core, so it runs on dedicated threads fed by
//! a bounded queue. When the queue is full a request is refused at once
//! ([`HashError::Busy`] → RESOURCE_EXHAUSTED) instead of waiting: a login storm cannot
//! starve the other requests this process serves. Unknown emails are verified against a
//! dummy hash with the same parameters, so they cost the same as wrong passwords.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use argon2::{
    Algorithm, Argon2, Block, Params, Version,
    password_hash::phc::{Output, ParamsString, PasswordHash, Salt},
};
use tokio::sync::oneshot;

use crate::domain::Password;

/// argon2id cost and pool size (`AUTH_ARGON2_*`, `AUTH_HASH_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HasherConfig {
    /// Memory per hash in KiB; OWASP's minimum for argon2id is 19456 (19 MiB).
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// Worker threads. The default leaves one core for everything else.
    pub workers: usize,
    /// Hash jobs allowed to wait; beyond it requests are refused.
    pub queue: usize,
}

impl HasherConfig {
    pub const OWASP_MEMORY_KIB: u32 = 19_456;
    pub const OWASP_ITERATIONS: u32 = 2;
    pub const OWASP_PARALLELISM: u32 = 1;

    pub fn default_workers() -> usize {
        thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1))
            .max(1)
    }

    fn params(&self) -> Result<Params, argon2::Error> {
        Params::new(self.memory_kib, self.iterations, self.parallelism, None)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyOutcome {
    Mismatch,
    /// The password is right; `needs_rehash` when the stored hash used other parameters.
    Match {
        needs_rehash: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("the password-hash queue is full")]
    Busy,
    #[error("password hashing failed: {0}")]
    Failed(String),
}

enum Job {
    Verify {
        password: Password,
        /// `None`: verify against the dummy hash (unknown account).
        phc: Option<String>,
        reply: oneshot::Sender<(Result<VerifyOutcome, HashError>, Duration)>,
    },
    Hash {
        password: Password,
        reply: oneshot::Sender<(Result<String, HashError>, Duration)>,
    },
}

/// The pool. Cheap to clone; the workers stop when the last clone is dropped.
#[derive(Clone)]
pub struct PasswordHasher {
    jobs: mpsc::SyncSender<(Instant, Job)>,
    queued: Arc<AtomicUsize>,
}

impl std::fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHasher")
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl PasswordHasher {
    /// Starts the workers. Computes the dummy hash once, with the configured parameters.
    pub fn start(config: HasherConfig) -> Result<Self, HashError> {
        let params = config
            .params()
            .map_err(|e| HashError::Failed(e.to_string()))?;
        let dummy = Hashing::new(params.clone()).hash(random_password().as_bytes())?;
        let (jobs, receiver) = mpsc::sync_channel::<(Instant, Job)>(config.queue);
        let receiver = Arc::new(Mutex::new(receiver));
        let queued = Arc::new(AtomicUsize::new(0));
        for worker in 0..config.workers.max(1) {
            let receiver = receiver.clone();
            let queued = queued.clone();
            let dummy = dummy.clone();
            let params = params.clone();
            thread::Builder::new()
                .name(format!("argon2-{worker}"))
                .spawn(move || run_worker(&receiver, &queued, &params, &dummy))
                .map_err(|e| HashError::Failed(e.to_string()))?;
        }
        Ok(Self { jobs, queued })
    }

    /// Checks `password` against `phc` (a stored PHC string), or against the dummy hash when
    /// there is no account, at the same cost.
    pub async fn verify(
        &self,
        password: Password,
        phc: Option<String>,
    ) -> Result<VerifyOutcome, HashError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Verify {
            password,
            phc,
            reply,
        })?;
        traced("argon2.verify", answer).await
    }

    /// A new PHC string for `password` with the configured parameters and a random salt.
    pub async fn hash(&self, password: Password) -> Result<String, HashError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Hash { password, reply })?;
        traced("argon2.hash", answer).await
    }

    /// Jobs waiting or running now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn submit(&self, job: Job) -> Result<(), HashError> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        match self.jobs.try_send((Instant::now(), job)) {
            Ok(()) => Ok(()),
            Err(error) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                match error {
                    mpsc::TrySendError::Full(_) => Err(HashError::Busy),
                    mpsc::TrySendError::Disconnected(_) => {
                        Err(HashError::Failed("workers gone".to_owned()))
                    }
                }
            }
        }
    }
}

/// Waits for a worker's answer inside a span that says how long the job queued for the pool
/// (`argon2.queue_wait_ms`) and how long it took in all, so a slow login is explained by its
/// trace.
async fn traced<T>(
    name: &'static str,
    answer: oneshot::Receiver<(Result<T, HashError>, Duration)>,
) -> Result<T, HashError> {
    use tracing::Instrument as _;
    let span = tracing::info_span!(
        "argon2",
        otel.name = name,
        argon2.queue_wait_ms = tracing::field::Empty,
    );
    let recorded = span.clone();
    let (result, waited) = answer
        .instrument(span)
        .await
        .map_err(|_| HashError::Failed("worker gone".to_owned()))?;
    recorded.record("argon2.queue_wait_ms", waited.as_secs_f64() * 1000.0);
    result
}

fn run_worker(
    receiver: &Mutex<mpsc::Receiver<(Instant, Job)>>,
    queued: &AtomicUsize,
    params: &Params,
    dummy: &str,
) {
    let mut hashing = Hashing::new(params.clone());
    loop {
        // The lock is held only while waiting for the next job, never while hashing.
        let next = match receiver.lock() {
            Ok(receiver) => receiver.recv(),
            Err(_) => return,
        };
        let Ok((enqueued_at, job)) = next else {
            return; // Every sender is gone: the pool was dropped.
        };
        let waited: Duration = enqueued_at.elapsed();
        metrics::histogram!("auth_hash_queue_wait_seconds").record(waited.as_secs_f64());
        // The counter drops before the reply goes out, so a caller that has its answer
        // never sees its own job still counted.
        match job {
            Job::Verify {
                password,
                phc,
                reply,
            } => {
                let outcome = match phc {
                    Some(phc) => hashing.verify(password.expose().as_bytes(), &phc),
                    None => {
                        // Same work as a real check; the answer is always "no".
                        let _ = hashing.verify(password.expose().as_bytes(), dummy);
                        Ok(VerifyOutcome::Mismatch)
                    }
                };
                queued.fetch_sub(1, Ordering::Relaxed);
                let _ = reply.send((outcome, waited));
            }
            Job::Hash { password, reply } => {
                let hashed = hashing.hash(password.expose().as_bytes());
                queued.fetch_sub(1, Ordering::Relaxed);
                let _ = reply.send((hashed, waited));
            }
        }
    }
}

/// One worker's hashing state. The argon2 memory (19 MiB at OWASP's parameters) is allocated
/// once and reused for every hash: allocating it per hash would leave the allocator holding
/// freed blocks, and the process would grow far beyond workers × memory.
struct Hashing {
    params: Params,
    blocks: Vec<Block>,
}

impl Hashing {
    fn new(params: Params) -> Self {
        let blocks = vec![Block::default(); params.block_count()];
        Self { params, blocks }
    }

    /// Memory for `params`, grown (and kept) if a stored hash used more than the current
    /// parameters.
    fn memory(&mut self, params: &Params) -> &mut [Block] {
        let needed = params.block_count();
        if self.blocks.len() < needed {
            self.blocks.resize(needed, Block::default());
        }
        &mut self.blocks[..needed]
    }

    /// A PHC string for `password` with the configured parameters and a random salt.
    fn hash(&mut self, password: &[u8]) -> Result<String, HashError> {
        let failed = |e: &dyn std::fmt::Display| HashError::Failed(e.to_string());
        let params = self.params.clone();
        let salt: [u8; 16] = rand::random();
        let mut out = vec![0u8; params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN)];
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        argon2
            .hash_password_into_with_memory(password, &salt, &mut out, self.memory(&params))
            .map_err(|e| failed(&e))?;
        let hash = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params).map_err(|e| failed(&e))?,
            salt: Some(Salt::new(&salt).map_err(|e| failed(&e))?),
            hash: Some(Output::new(&out).map_err(|e| failed(&e))?),
        };
        Ok(hash.to_string())
    }

    /// Checks `password` against a stored PHC string, with the parameters stored in it.
    fn verify(&mut self, password: &[u8], phc: &str) -> Result<VerifyOutcome, HashError> {
        let unreadable =
            |e: &dyn std::fmt::Display| HashError::Failed(format!("stored hash unreadable: {e}"));
        let parsed = PasswordHash::new(phc).map_err(|e| unreadable(&e))?;
        let algorithm =
            Algorithm::try_from(parsed.algorithm.as_str()).map_err(|e| unreadable(&e))?;
        let version = parsed
            .version
            .map(Version::try_from)
            .transpose()
            .map_err(|e| unreadable(&e))?
            .unwrap_or_default();
        let params = Params::try_from(&parsed).map_err(|e| unreadable(&e))?;
        let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
            return Err(HashError::Failed(
                "stored hash has no salt or output".to_owned(),
            ));
        };
        let mut out = vec![0u8; expected.len()];
        let argon2 = Argon2::new(algorithm, version, params.clone());
        argon2
            .hash_password_into_with_memory(password, salt.as_ref(), &mut out, self.memory(&params))
            .map_err(|e| HashError::Failed(e.to_string()))?;
        // `Output`'s equality is constant-time.
        let computed = Output::new(&out).map_err(|e| HashError::Failed(e.to_string()))?;
        if computed != *expected {
            return Ok(VerifyOutcome::Mismatch);
        }
        let needs_rehash = algorithm != Algorithm::Argon2id
            || version != Version::V0x13
            || params.m_cost() != self.params.m_cost()
            || params.t_cost() != self.params.t_cost()
            || params.p_cost() != self.params.p_cost();
        Ok(VerifyOutcome::Match { needs_rehash })
    }
}

fn random_password() -> String {
    let bytes: [u8; 24] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Cheap parameters: these tests are about behaviour, not cost.
    fn cheap(workers: usize, queue: usize) -> HasherConfig {
        HasherConfig {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
            workers,
            queue,
        }
    }

    fn password(p: &str) -> Password {
        Password::parse_presented("password", p).unwrap()
    }

    #[tokio::test]
    async fn hashes_verify_and_flag_old_parameters() {
        let hasher = PasswordHasher::start(cheap(1, 4)).unwrap();
        let phc = hasher
            .hash(password("correct horse battery staple"))
            .await
            .unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{phc}");
        assert_eq!(
            hasher
                .verify(password("correct horse battery staple"), Some(phc.clone()))
                .await
                .unwrap(),
            VerifyOutcome::Match {
                needs_rehash: false
            }
        );
        assert_eq!(
            hasher
                .verify(password("wrong horse battery staple"), Some(phc.clone()))
                .await
                .unwrap(),
            VerifyOutcome::Mismatch
        );
        assert_eq!(
            hasher
                .verify(password("anything at all"), None)
                .await
                .unwrap(),
            VerifyOutcome::Mismatch
        );

        let stronger = PasswordHasher::start(HasherConfig {
            iterations: 2,
            ..cheap(1, 4)
        })
        .unwrap();
        assert_eq!(
            stronger
                .verify(password("correct horse battery staple"), Some(phc))
                .await
                .unwrap(),
            VerifyOutcome::Match { needs_rehash: true }
        );
    }

    #[test]
    fn hashes_interoperate_with_the_standard_phc_implementation() {
        use argon2::{PasswordHasher as _, PasswordVerifier as _};
        let params = Params::new(64, 1, 1, None).unwrap();
        let mut ours = Hashing::new(params.clone());
        let standard = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);

        let phc = ours.hash(b"correct horse battery staple").unwrap();
        assert!(
            standard
                .verify_password(b"correct horse battery staple", phc.as_str())
                .is_ok()
        );
        assert!(standard.verify_password(b"wrong", phc.as_str()).is_err());

        let theirs = standard
            .hash_password_with_salt(b"correct horse battery staple", b"saltsaltsaltsalt")
            .unwrap()
            .to_string();
        assert_eq!(
            ours.verify(b"correct horse battery staple", &theirs)
                .unwrap(),
            VerifyOutcome::Match {
                needs_rehash: false
            }
        );
        assert_eq!(
            ours.verify(b"wrong", &theirs).unwrap(),
            VerifyOutcome::Mismatch
        );
        assert!(ours.verify(b"x", "not a phc string").is_err());
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        // Slow hashes on one worker with a queue of one: the third concurrent job is refused.
        let hasher = PasswordHasher::start(HasherConfig {
            memory_kib: 8 * 1024,
            iterations: 8,
            ..cheap(1, 1)
        })
        .unwrap();
        let jobs: Vec<_> = (0..6)
            .map(|_| {
                let hasher = hasher.clone();
                tokio::spawn(async move { hasher.hash(password("some long passphrase")).await })
            })
            .collect();
        let mut busy = 0;
        for job in jobs {
            if matches!(job.await.unwrap(), Err(HashError::Busy)) {
                busy += 1;
            }
        }
        assert!(busy >= 1, "some jobs must be refused, none were");
        assert_eq!(hasher.queued(), 0, "the counter returns to zero");
    }
}
