//! The `trainyard serve` process: the HTTP API and dashboard ([`super::api`]) and the
//! worker processes it supervises.
//!
//! - Workers are `trainyard worker` children, started with a parent-death signal: when
//!   the server dies, even by SIGKILL, they stop their runs (a training stage
//!   checkpoints) and put their jobs back in the queue.
//! - A worker that dies is started again, and its job requeued; so is any job whose
//!   worker's heartbeat went silent. On start, every job left `running` by an earlier
//!   server is requeued: its workers are gone.
//! - The token is made on first start (`.trainyard/serve/token`, mode 0600) unless
//!   `--token-file` names one. One server per workspace (a lock file).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::api::{AppState, router};
use super::queue::Queue;
use super::worker::stop_with_parent;

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// Worker processes.
    pub workers: usize,
    /// A file holding the token, instead of `.trainyard/serve/token`.
    pub token_file: Option<PathBuf>,
    /// The workers' heartbeat period; a job whose worker is silent for ten of them is
    /// requeued.
    pub heartbeat: Duration,
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// File system or network.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The queue.
    #[error(transparent)]
    Queue(#[from] super::queue::QueueError),
    /// Another server holds the workspace.
    #[error("another `trainyard serve` runs on this workspace (lock {0})")]
    Busy(PathBuf),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let context = context.into();
    move |source| ServeError::Io { context, source }
}

/// The token file of the workspace at `root`.
pub fn default_token_file(root: &Path) -> PathBuf {
    root.join(".trainyard").join("serve").join("token")
}

/// The token: read from `token_file`, or from the workspace's own file, made (32 random
/// bytes, hex; mode 0600) when missing.
pub fn load_token(root: &Path, token_file: Option<&Path>) -> Result<String, ServeError> {
    if let Some(path) = token_file {
        let token = std::fs::read_to_string(path)
            .map_err(io(format!("reading the token file {}", path.display())))?;
        let token = token.trim().to_string();
        if token.is_empty() {
            return Err(ServeError::Io {
                context: format!("the token file {}", path.display()),
                source: std::io::Error::other("it is empty"),
            });
        }
        return Ok(token);
    }
    let path = default_token_file(root);
    if let Ok(token) = std::fs::read_to_string(&path)
        && !token.trim().is_empty()
    {
        return Ok(token.trim().to_string());
    }
    let mut bytes = [0u8; 32];
    {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut random| random.read_exact(&mut bytes))
            .map_err(io("reading /dev/urandom"))?;
    }
    let token: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(format!("creating {}", path.display())))?;
    use std::io::Write;
    writeln!(file, "{token}").map_err(io(format!("writing {}", path.display())))?;
    Ok(token)
}

/// Holds the workspace's serve lock for as long as it lives.
struct ServeLock {
    _file: std::fs::File,
}

fn lock(root: &Path) -> Result<ServeLock, ServeError> {
    let path = root.join(".trainyard").join("serve").join("lock");
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(ServeError::Busy(path));
    }
    Ok(ServeLock { _file: file })
}

/// One supervised worker process.
struct Worker {
    name: String,
    child: Option<Child>,
}

fn spawn_worker(root: &Path, name: &str, heartbeat: Duration) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    command
        .arg("--workspace")
        .arg(root)
        .arg("worker")
        .arg("--name")
        .arg(name)
        .arg("--heartbeat-ms")
        .arg(heartbeat.as_millis().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    stop_with_parent(&mut command);
    command.spawn()
}

/// Keeps `workers` running and requeues the jobs of dead or silent ones, until `stop`;
/// then stops the workers (each puts its job back in the queue) and waits for them.
fn supervise(root: &Path, workers: &mut [Worker], heartbeat: Duration, stop: &AtomicBool) {
    let silent = heartbeat * 10;
    let mut queue = None;
    while !stop.load(Ordering::Relaxed) {
        if queue.is_none() {
            queue = Queue::open(root)
                .map_err(|error| eprintln!("the job queue: {error}"))
                .ok();
        }
        let exited: Vec<usize> = workers
            .iter_mut()
            .enumerate()
            .filter_map(|(index, worker)| match &mut worker.child {
                Some(child) => (!matches!(child.try_wait(), Ok(None))).then_some(index),
                None => Some(index),
            })
            .collect();
        if !exited.is_empty() {
            // The jobs of the dead workers go back to the queue; the others still beat.
            let alive: Vec<String> = workers
                .iter()
                .enumerate()
                .filter(|(index, _)| !exited.contains(index))
                .map(|(_, worker)| worker.name.clone())
                .collect();
            if let Some(queue) = &queue {
                let _ = queue.requeue_stale(None, Some(&alive));
            }
            for index in exited {
                let worker = &mut workers[index];
                worker.child = spawn_worker(root, &worker.name, heartbeat)
                    .map_err(|error| eprintln!("starting worker {}: {error}", worker.name))
                    .ok();
            }
        }
        if let Some(queue) = &queue {
            let _ = queue.requeue_stale(Some(silent), None);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for worker in workers.iter() {
        if let Some(child) = &worker.child
            && let Ok(pid) = libc::pid_t::try_from(child.id())
        {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    for worker in workers.iter_mut() {
        if let Some(child) = &mut worker.child {
            let _ = child.wait();
        }
    }
}

/// Runs the server until SIGINT or SIGTERM.
pub fn serve(root: &Path, options: &ServeOptions) -> Result<(), ServeError> {
    let root = root
        .canonicalize()
        .map_err(io(format!("workspace {}", root.display())))?;
    let _lock = lock(&root)?;
    let token = load_token(&root, options.token_file.as_deref())?;
    let queue = Queue::open(&root)?;
    // An earlier server's workers are gone (they stop with it).
    let requeued = queue.requeue_stale(None, Some(&[]))?;
    drop(queue);
    if !requeued.is_empty() {
        eprintln!(
            "requeued {} job(s) an earlier server left running: {requeued:?}",
            requeued.len()
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(io("installing the signal handlers"))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(options.listen))
        .map_err(io(format!("listening on {}", options.listen)))?;
    let address = listener
        .local_addr()
        .map_err(io("reading the listening address"))?;
    let token_path = options
        .token_file
        .clone()
        .unwrap_or_else(|| default_token_file(&root));
    // The first line says where: a test or a script reads it to find a free port.
    println!("listening on http://{address}");
    eprintln!(
        "dashboard: http://{address}/#token=… (the token is in {}); {} worker(s)",
        token_path.display(),
        options.workers
    );
    let state = Arc::new(AppState {
        root: root.clone(),
        token,
    });
    let app = router(state);
    let server_stop = stop.clone();
    let server = runtime.spawn(async move {
        let shutdown = async move {
            while !server_stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    let mut workers: Vec<Worker> = (0..options.workers.max(1))
        .map(|index| Worker {
            name: format!("serve-{}-{index}", std::process::id()),
            child: None,
        })
        .collect();
    supervise(&root, &mut workers, options.heartbeat, &stop);
    let _ = runtime.block_on(server);
    Ok(())
}
