//! The command line: a thin clap layer over the library.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::audit::{self, ReproduceOptions};

use crate::config::{self, LoadOptions, ResolvedPipeline};
use crate::dag::{self, DagFormat};
use crate::executor::{self, RunOptions};
use crate::generate::{Conversation, Generation, Generator, SamplingOptions};
use crate::interrupt::CancelFlag;
use crate::retrieve::{self, Index};
use crate::runs::{RunStatus, StageStatus};
use crate::stages::training_stage::DeviceSetting;
use crate::store::{self, Workspace};

/// The files `trainyard schema` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemaFor {
    /// Pipeline files (`pipelines/*.yaml`).
    Pipeline,
    /// Profile files (`profiles/*.yaml`).
    Profile,
}

/// Declarative, fingerprinted language-model training pipelines.
#[derive(Debug, Parser)]
#[command(name = "trainyard", version, about)]
pub struct Cli {
    /// Workspace root: holds `.trainyard/` (the store) and `runs/`. Defaults to the
    /// current directory.
    #[arg(long, global = true, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Log more on standard error: -v info, -vv debug, -vvv trace. Without -v or -q the
    /// filter is `TRAINYARD_LOG`, else `RUST_LOG` (tracing-subscriber directives such as
    /// `trainyard=debug`), else warnings.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log errors only (results and progress lines are still printed).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline; only stages whose fingerprint has no finished output run.
    Run(RunArgs),
    /// Show, per stage, `cached` or `will run` and why.
    Status(PipelineArgs),
    /// Check a run's inputs and outputs against its record (`--reproduce`: and rerun it).
    ///
    /// Hashes every input and output that `RUN_DIR/resolved_settings.json` lists again and
    /// reports, per stage, what is missing or differs: exit 1 if anything does, 2 if the
    /// run directory is unreadable. A changed pipeline or profile file is only a warning.
    /// `--reproduce` also runs the recorded settings again in a fresh workspace and
    /// compares every stage's output with the record, bit for bit.
    Audit(AuditArgs),
    /// Remove store entries no run record references and scratch left by failed or
    /// killed stages (training checkpoints are kept). Never touches quarantine.
    Gc {
        /// List what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the stage graph.
    Dag {
        /// The pipeline file and its overrides.
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: DagFormat,
    },
    /// Print every resolved setting with where it came from.
    Resolve {
        /// The pipeline file and its overrides.
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Print JSON (`values` and `origins`) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON schema of pipeline files (or, with `profile`, of profile files), for
    /// editors: `schemas/` holds both, pointed at by each shipped file's first line.
    Schema {
        /// Which files the schema is for.
        #[arg(value_enum, default_value_t = SchemaFor::Pipeline)]
        which: SchemaFor,
        /// Write it to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// List the stage kinds.
    Kinds,
    /// List the profiles available to a pipeline (or, without FILE, the workspace's
    /// `profiles/` directory), with their descriptions.
    Profiles {
        /// The pipeline file.
        file: Option<PathBuf>,
    },
    /// Retrieve documents for a question with BM25 and run the coverage gate alone, as
    /// `chat --retrieve` does before answering. Exit 0 when the gate passes, 1 when it
    /// refuses, 2 when the dataset or the flags are bad.
    VerifyQuestion(VerifyQuestionArgs),
    /// Generate text from a model: a chat answer, or with `--raw` a plain continuation.
    Generate(GenerateArgs),
    /// Chat with a model: a REPL over standard input that keeps the conversation
    /// (`/reset` clears it, `/exit` or end of input quits), or one answer with `--prompt`.
    Chat(ChatArgs),
    /// Serve the workspace: a durable job queue, an HTTP API with live events, and a
    /// dashboard; worker processes run the queued jobs.
    Serve(ServeArgs),
    /// Queue a pipeline run for `serve`'s workers (the same flags as `run`); prints the
    /// job id.
    Submit(SubmitArgs),
    /// List the jobs of the workspace's queue.
    Jobs {
        /// Only jobs in this state (queued, running, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job: a queued one at once, a running one by SIGTERM to its run (a
    /// training stage checkpoints first).
    Cancel {
        /// The job id.
        id: i64,
    },
    /// Print the events (`logs.jsonl`) of a run (`runs/<id>`, or its id) or of a job's
    /// latest run; `--follow` waits for more until the run (or job) is over.
    Logs {
        /// A run directory, a run id, or a job id.
        target: String,
        /// Keep printing new events until the run or job finishes.
        #[arg(long, short)]
        follow: bool,
    },
    /// Run one stage of a run submitted to Slurm, on the node its job landed on (the
    /// batch scripts that `run --executor slurm` submits call this).
    #[command(hide = true)]
    ExecStage {
        /// The stage job's id: `.trainyard/slurm/jobs/<JOB>.json`.
        job: String,
    },
    /// A worker of `serve` (started by it): runs queued jobs.
    #[command(hide = true)]
    Worker {
        /// Its name in the queue.
        #[arg(long)]
        name: String,
        /// Heartbeat period in milliseconds.
        #[arg(long, default_value_t = 1000)]
        heartbeat_ms: u64,
    },
}

/// `trainyard serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (localhost by default; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8377")]
    pub listen: std::net::SocketAddr,
    /// Worker processes running jobs.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Read the bearer token from this file instead of `.trainyard/serve/token` (made,
    /// mode 0600, on first start).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Workers' heartbeat period in milliseconds (a job whose worker is silent for ten
    /// of them goes back to the queue).
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
}

/// `trainyard submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The pipeline file (inside the workspace) and its overrides.
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Which stages run and how, as for `run`.
    #[command(flatten)]
    pub selection: RunSelection,
    /// Queue a failed run again up to this many times.
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
}

/// Retrieval from a dataset: the flags `verify-question` and `chat` share.
#[derive(Debug, Args)]
pub struct RetrievalArgs {
    /// The documents: a JSONL file (text from `text`, `body_text` or `chunks[].text`, as
    /// ingest reads it) or an ingest output directory (its train.jsonl and eval.jsonl).
    #[arg(long, value_name = "DATASET")]
    pub retrieve: PathBuf,
    /// How many of the best documents to retrieve and put before the question.
    #[arg(long, value_name = "K", default_value_t = retrieve::DEFAULT_CONTEXT_DOCS, value_parser = parse_positive)]
    pub context_docs: usize,
    /// The fraction of the question's keywords the retrieved documents must contain for
    /// the question to be answered (0 to 1).
    #[arg(long, value_name = "RATIO", default_value_t = retrieve::DEFAULT_THRESHOLD, value_parser = parse_ratio)]
    pub threshold: f64,
}

/// `trainyard verify-question`.
#[derive(Debug, Args)]
pub struct VerifyQuestionArgs {
    /// Where to retrieve from, and how much.
    #[command(flatten)]
    pub retrieval: RetrievalArgs,
    /// Print JSON (hits, coverage, verdict) instead of text.
    #[arg(long)]
    pub json: bool,
    /// The question.
    pub question: String,
}

fn parse_positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(value) => Ok(value),
        Err(error) => Err(error.to_string()),
    }
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        Ok(_) => Err("must be between 0 and 1".to_string()),
        Err(error) => Err(error.to_string()),
    }
}

/// The model and how to sample from it, shared by `generate` and `chat`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A model directory: a checkpoint, an export, a pretrain output or a run's stage
    /// output (`runs/latest/outputs/<stage>`).
    #[arg(value_name = "MODEL_DIR")]
    pub model: PathBuf,
    /// System prompt.
    #[arg(long, value_name = "TEXT", conflicts_with = "system_file")]
    pub system: Option<String>,
    /// Read the system prompt from a file.
    #[arg(long, value_name = "FILE")]
    pub system_file: Option<PathBuf>,
    /// Softmax temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to P.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,
    /// Seed of the sampler (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens to generate per answer.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Where to run: auto, cpu, cuda or metal.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceSetting,
    /// Print prompt length, generated tokens and decode speed (tokens/s after the first
    /// token) to standard error.
    #[arg(long)]
    pub stats: bool,
    /// Keep f32 weight matrices as bf16 in memory, rounded once at load: half the bytes
    /// each generated token reads (decoding is bound by them), at bf16's precision;
    /// products still sum in f32. Matrices stored as bf16/f16 are read so anyway.
    #[arg(long)]
    pub bf16_weights: bool,
}

/// `trainyard generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model directory and sampling options.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt: the user's message, or with `--raw` the text to continue.
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// Continue plain text without the chat template (for pretrain-only models).
    #[arg(long, conflicts_with_all = ["system", "system_file"])]
    pub raw: bool,
}

/// `trainyard chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The model directory and sampling options.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Answer this one message and exit instead of reading standard input.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Answer from documents: rank DATASET (JSONL or an ingest output) with BM25, put
    /// the best `--context-docs` before each question, and refuse questions whose
    /// keywords the retrieved documents do not cover (`--threshold`).
    #[arg(long, value_name = "DATASET")]
    pub retrieve: Option<PathBuf>,
    /// Documents put before each question in retrieval mode.
    #[arg(long, value_name = "K", default_value_t = retrieve::DEFAULT_CONTEXT_DOCS, value_parser = parse_positive)]
    pub context_docs: usize,
    /// The fraction of the question's keywords the documents must contain (0 to 1).
    #[arg(long, value_name = "RATIO", default_value_t = retrieve::DEFAULT_THRESHOLD, value_parser = parse_ratio)]
    pub threshold: f64,
    /// Characters kept of each retrieved document, so that they fit a small context.
    #[arg(long, value_name = "N", default_value_t = 400, value_parser = parse_positive)]
    pub doc_chars: usize,
}

/// What retrieval mode does with one question: the prompt to answer, or why not.
fn retrieval_prompt(
    index: &Index,
    args: &ChatArgs,
    question: &str,
) -> Result<String, retrieve::Refusal> {
    let result = index.retrieve(question, args.context_docs, args.threshold);
    if let Some(refusal) = result.coverage.refusal() {
        return Err(refusal);
    }
    let trimmed: Vec<retrieve::Document> = result
        .hits
        .iter()
        .map(|hit| {
            let document = index.document(hit);
            retrieve::Document {
                id: document.id.clone(),
                title: document.title.clone(),
                text: document.text.chars().take(args.doc_chars).collect(),
            }
        })
        .collect();
    let documents: Vec<&retrieve::Document> = trimmed.iter().collect();
    Ok(retrieve::context_prompt(question, &documents))
}

fn parse_device(text: &str) -> Result<DeviceSetting, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string()))
        .map_err(|_| format!("`{text}` is not one of auto, cpu, cuda, metal"))
}

/// A pipeline file and how to resolve it.
#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// The pipeline file (YAML or TOML).
    pub file: PathBuf,
    /// Profiles to apply, in order (`--profile dev,cpu` or repeated).
    #[arg(long, short, value_name = "NAME")]
    pub profile: Vec<String>,
    /// Override a setting: `--set stages.train.with.steps=100` (repeatable; wins over all).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// The flags of `run` that a queued job (`submit`) takes too: which stages run, and how.
#[derive(Debug, Args)]
pub struct RunSelection {
    /// Rerun this stage even if cached (repeatable).
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// Rerun every stage.
    #[arg(long)]
    pub force_all: bool,
    /// Run only this stage; its upstream stages must already be cached.
    #[arg(long, value_name = "STAGE", conflicts_with = "until")]
    pub only: Option<String>,
    /// Run this stage and what it depends on, nothing downstream.
    #[arg(long, value_name = "STAGE")]
    pub until: Option<String>,
    /// After a failure, keep running stages that do not depend on it.
    #[arg(long)]
    pub keep_going: bool,
    /// Start interrupted training stages over instead of resuming from their last
    /// checkpoint (which is discarded).
    #[arg(long)]
    pub no_resume: bool,
    /// Re-read every input and stored output before using it, instead of trusting
    /// files whose size, mtime and inode are unchanged; a stored output that differs
    /// from its manifest is moved to `.trainyard/quarantine/` and its stage reruns.
    #[arg(long)]
    pub verify: bool,
}

/// `trainyard run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline file and its overrides.
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Which stages run, and how.
    #[command(flatten)]
    pub selection: RunSelection,
    /// Show what would run, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Stages to run at the same time.
    #[arg(long, short, default_value_t = 1)]
    pub jobs: usize,
    /// Fail at once if another run holds the workspace lock, instead of waiting.
    #[arg(long)]
    pub no_wait: bool,
    /// When stderr is not a terminal (a log file, a service), print a progress line
    /// this often: the running stages, their elapsed time and training step, loss and
    /// speed. 0 turns it off.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub progress_every: u64,
    /// Where stages run: here (`local`) or as Slurm jobs (`slurm`); overrides the
    /// pipeline's and profiles' `executor.kind`.
    #[arg(long, value_enum, value_name = "EXECUTOR")]
    pub executor: Option<ExecutorFlag>,
    /// With the Slurm executor: return once the jobs are submitted; `trainyard status`
    /// follows them.
    #[arg(long)]
    pub detach: bool,
}

/// `--executor`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExecutorFlag {
    /// On this machine.
    Local,
    /// One Slurm job per stage.
    Slurm,
}

/// `trainyard audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The run directory: `runs/<run-id>` or `runs/latest`.
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// Also run the recorded settings again in a fresh workspace and compare each
    /// stage's output hash with the record (the original store is only read).
    #[arg(long)]
    pub reproduce: bool,
    /// Reproduce into this directory (it must not exist or be empty) and keep it; by
    /// default a temporary directory is used and removed afterwards.
    #[arg(long, value_name = "DIR", requires = "reproduce")]
    pub into: Option<PathBuf>,
    /// Stages to run at the same time while reproducing.
    #[arg(long, short, default_value_t = 1)]
    pub jobs: usize,
    /// Print JSON (`audit`, `reproduction`, `passed`) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Exit status for configuration errors (bad pipeline, bad flags).
const EXIT_CONFIG: u8 = 2;
/// Exit status when the workspace is locked by another run and `--no-wait` was given.
const EXIT_BUSY: u8 = 3;
/// Exit status for I/O and environment errors.
const EXIT_IO: u8 = 4;
/// Exit status after Ctrl-C / SIGTERM.
const EXIT_INTERRUPTED: u8 = 130;

/// `trainyard status | head` must end like `cat` does when `head` stops reading, not
/// panic in `println!`: Rust ignores SIGPIPE, so its default action is restored. Not
/// for `run`: a run whose console reader went away finishes its work and records it (it
/// writes through [`crate::console`], which never panics).
fn end_quietly_on_a_broken_pipe() {
    // SAFETY: setting a signal's disposition to its default at start-up, before any
    // thread exists, has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// `println!` panics when stdout cannot be written (`trainyard status > /dev/full`): such
/// a panic ends the command with one error line and the I/O exit status, not a backtrace
/// and 101. Every other panic keeps the default report.
fn end_cleanly_when_output_fails() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if let Some(reason) = message.strip_prefix("failed printing to ") {
            crate::console::line(format_args!("error: cannot write to {reason}"));
            std::process::exit(i32::from(EXIT_IO));
        }
        default(info);
    }));
}

/// The log filter: -v/-q when given (this invocation's wish beats the environment's),
/// else `TRAINYARD_LOG` (trainyard's own name wins over the generic one), else
/// `RUST_LOG`, else warnings. A variable that does not parse counts as unset.
fn log_filter(cli: &Cli) -> EnvFilter {
    match (cli.quiet, cli.verbose) {
        (true, _) => EnvFilter::new("error"),
        (false, 0) => ["TRAINYARD_LOG", "RUST_LOG"]
            .into_iter()
            .find_map(|variable| EnvFilter::try_from_env(variable).ok())
            .unwrap_or_else(|| EnvFilter::new("warn")),
        (false, n) => EnvFilter::new(["info", "debug", "trace"][usize::from(n.min(3)) - 1]),
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    end_cleanly_when_output_fails();
    crate::memory::keep_freed_memory();
    let cli = Cli::parse();
    // Not for the server and its workers either: a client that goes away mid-response
    // (a closed dashboard tab) must cost a connection, not the server.
    let long_running = matches!(&cli.command, Command::Run(args) if !args.dry_run)
        || matches!(
            &cli.command,
            Command::Serve(_) | Command::Worker { .. } | Command::ExecStage { .. }
        );
    if !long_running {
        end_quietly_on_a_broken_pipe();
    }
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(&cli))
        .with_writer(std::io::stderr)
        .init();
    match dispatch(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", render_error(&error));
            ExitCode::from(exit_code(&error))
        }
    }
}

/// The error and its causes, each said once: many errors quote their source in their
/// own message (`cannot lock …: Permission denied`), and the chain would repeat it.
fn render_error(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

/// The documented exit code of a failed command: 3 when the workspace is busy (and
/// `--no-wait` was given), 4 for I/O and environment errors, 2 for invalid pipelines,
/// settings and flags.
fn exit_code(error: &anyhow::Error) -> u8 {
    use executor::ExecError;
    use store::LockError;
    fn lock<'e>(cause: &'e (dyn std::error::Error + 'static)) -> Option<&'e LockError> {
        match cause.downcast_ref::<ExecError>() {
            Some(ExecError::Lock(lock)) => Some(lock),
            _ => cause.downcast_ref::<LockError>(),
        }
    }
    if error.chain().any(|cause| {
        matches!(lock(cause), Some(LockError::Busy { .. }))
            || matches!(
                cause.downcast_ref::<ExecError>(),
                Some(ExecError::SlurmBusy { .. })
            )
    }) {
        return EXIT_BUSY;
    }
    if error
        .chain()
        .any(|cause| matches!(lock(cause), Some(LockError::Interrupted)))
    {
        return EXIT_INTERRUPTED;
    }
    let io = error.chain().any(|cause| {
        cause.is::<std::io::Error>()
            || matches!(lock(cause), Some(LockError::Io { .. }))
            || matches!(
                cause.downcast_ref::<ExecError>(),
                Some(ExecError::Io { .. })
            )
            || cause.is::<crate::gc::GcError>()
    });
    if io { EXIT_IO } else { EXIT_CONFIG }
}

fn workspace(cli_workspace: &Option<PathBuf>) -> anyhow::Result<Workspace> {
    let root = match cli_workspace {
        Some(root) => root.clone(),
        None => std::env::current_dir()?,
    };
    Ok(Workspace::new(&root)?)
}

/// `trainyard gc`: under the lock (fails at once if a run holds it: exit 3).
fn gc_command(workspace: &Workspace, dry_run: bool) -> anyhow::Result<ExitCode> {
    let _lock = workspace.lock(false, &mut |_| {}, None)?;
    // Scratch that a detached run's Slurm jobs are writing is not garbage.
    executor::slurm::settle_unfollowed(workspace)?;
    let plan = crate::gc::plan(workspace)?;
    let shown = |path: &std::path::Path| {
        path.strip_prefix(&workspace.root)
            .unwrap_or(path)
            .display()
            .to_string()
    };
    let verb = if dry_run { "would remove" } else { "remove" };
    for (path, size, why) in &plan.remove {
        let why = match why {
            crate::gc::Garbage::Unreferenced => "no run references it",
            crate::gc::Garbage::Scratch => "scratch of a stage that is not running",
        };
        println!("{verb}  {}  ({}, {why})", shown(path), human_bytes(*size));
    }
    let restore = if dry_run { "would restore" } else { "restore" };
    for aside in &plan.restored {
        println!(
            "{restore}  {}  (the only copy of a store entry a killed run moved aside)",
            shown(aside)
        );
    }
    for kept in &plan.kept_checkpoints {
        println!(
            "keep          {}  (a checkpoint to resume from; `run --no-resume` discards it)",
            shown(kept)
        );
    }
    let total: u64 = plan.remove.iter().map(|(_, size, _)| size).sum();
    if dry_run {
        println!(
            "gc --dry-run: {} path(s), {} would be freed",
            plan.remove.len(),
            human_bytes(total)
        );
    } else {
        let freed = crate::gc::apply(workspace, &plan)?;
        println!(
            "gc: removed {} path(s), {} freed",
            plan.remove.len(),
            human_bytes(freed)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn load(args: &PipelineArgs, workspace: &Workspace) -> anyhow::Result<ResolvedPipeline> {
    let options = LoadOptions {
        profiles: args.profile.clone(),
        overrides: args.set.clone(),
        env: std::env::vars().collect(),
        profile_dirs: vec![workspace.root.join("profiles")],
    };
    Ok(config::load(&args.file, &options)?)
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let workspace = workspace(&cli.workspace)?;
    match cli.command {
        Command::Run(args) => run(args, &workspace),
        Command::ExecStage { job } => exec_stage_command(&workspace, &job),
        Command::Status(args) => {
            let pipeline = load(&args, &workspace)?;
            let dag = dag::build(&pipeline)?;
            let report = executor::status(&workspace, &pipeline, &dag)?;
            print_header(&pipeline);
            print_unfollowed_slurm_runs(&workspace);
            print_report(&report.stages, &pipeline);
            left_for_exit((pipeline, dag, report));
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(args) => audit_command(&args, &workspace),
        Command::Gc { dry_run } => gc_command(&workspace, dry_run),
        Command::Serve(args) => {
            let options = crate::serve::server::ServeOptions {
                listen: args.listen,
                workers: args.workers,
                token_file: args.token_file,
                heartbeat: std::time::Duration::from_millis(args.heartbeat_ms.max(50)),
            };
            crate::serve::server::serve(&workspace.root, &options)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit(args) => submit_command(args, &workspace),
        Command::Jobs { state, json } => jobs_command(&workspace, state.as_deref(), json),
        Command::Cancel { id } => {
            let queue = crate::serve::queue::Queue::open(&workspace.root)?;
            let state = queue.cancel(id)?;
            println!(
                "job {id}: {}",
                if state == crate::serve::queue::JobState::Running {
                    "cancelling (its run was told to stop)"
                } else {
                    state.as_str()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { target, follow } => logs_command(&workspace, &target, follow),
        Command::Worker { name, heartbeat_ms } => {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, stop.clone())?;
            }
            let heartbeat = std::time::Duration::from_millis(heartbeat_ms.max(50));
            let options = crate::serve::worker::WorkerOptions {
                name,
                heartbeat,
                poll: heartbeat.min(std::time::Duration::from_millis(500)),
                progress_every: std::time::Duration::from_secs(30),
            };
            crate::serve::worker::work(&workspace.root, &options, &stop)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dag {
            pipeline: args,
            format,
        } => {
            let pipeline = load(&args, &workspace)?;
            let dag = dag::build(&pipeline)?;
            print!("{}", dag.render(&pipeline, format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Resolve {
            pipeline: args,
            json,
        } => {
            let pipeline = load(&args, &workspace)?;
            if json {
                let origins: std::collections::BTreeMap<&String, String> = pipeline
                    .origins
                    .iter()
                    .map(|(key, origin)| (key, origin.to_string()))
                    .collect();
                let document =
                    serde_json::json!({ "values": pipeline.values_json(), "origins": origins });
                println!("{}", serde_json::to_string_pretty(&document)?);
            } else {
                print_resolved(&pipeline);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { which, output } => {
            let text = match which {
                SchemaFor::Pipeline => config::schema::pipeline_schema_text(),
                SchemaFor::Profile => config::schema::profile_schema_text(),
            };
            match output {
                Some(path) => std::fs::write(&path, text)
                    .map_err(|error| anyhow::anyhow!("writing {}: {error}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Kinds => {
            for kind in crate::stages::KINDS {
                println!("{:<14} v{:<3} {}", kind.name, kind.version, kind.summary);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Profiles { file } => {
            let dirs = [workspace.root.join("profiles")];
            let profiles = match &file {
                Some(file) => config::available_profiles(file, &dirs)?,
                None => config::profile_files(&dirs, &[])?,
            };
            if profiles.is_empty() {
                match &file {
                    Some(file) => println!("no profiles for {}", file.display()),
                    None => println!("no profiles in {}", dirs[0].display()),
                }
            }
            for profile in profiles {
                let place = if profile.inline {
                    "inline".to_string()
                } else {
                    profile.file.path.display().to_string()
                };
                println!(
                    "{:<10} {}  [{}]",
                    profile.name,
                    profile.description.unwrap_or_default(),
                    place
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::VerifyQuestion(args) => verify_question(&args),
        Command::Generate(args) => generate(args, &workspace),
        Command::Chat(args) => chat_command(args, &workspace),
    }
}

/// How many characters of each retrieved document `verify-question` shows.
const PREVIEW_CHARS: usize = 100;

fn verify_question(args: &VerifyQuestionArgs) -> anyhow::Result<ExitCode> {
    let retrieval = &args.retrieval;
    let index = Index::open(&retrieval.retrieve)?;
    let result = index.retrieve(&args.question, retrieval.context_docs, retrieval.threshold);
    let refusal = result.coverage.refusal();
    if args.json {
        let hits: Vec<serde_json::Value> = result
            .hits
            .iter()
            .enumerate()
            .map(|(rank, hit)| {
                let document = index.document(hit);
                serde_json::json!({
                    "rank": rank + 1,
                    "doc": hit.doc,
                    "id": document.id,
                    "title": document.title,
                    "score": hit.score,
                    "preview": retrieve::preview(&document.text, PREVIEW_CHARS),
                })
            })
            .collect();
        let report = serde_json::json!({
            "question": args.question,
            "dataset": display(&retrieval.retrieve),
            "documents": index.len(),
            "hits": hits,
            "coverage": result.coverage,
            "passed": refusal.is_none(),
            "refusal": refusal,
            "message": refusal.as_ref().map(ToString::to_string),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_retrieval(&index, &result, &retrieval.retrieve);
        match &refusal {
            None => println!("verdict: pass"),
            Some(refusal) => println!("verdict: refuse: {refusal}"),
        }
    }
    Ok(match refusal {
        None => ExitCode::SUCCESS,
        Some(_) => ExitCode::FAILURE,
    })
}

fn print_retrieval(index: &Index, result: &retrieve::Retrieval, dataset: &Path) {
    println!(
        "retrieved {} of {} documents in {}",
        result.hits.len(),
        index.len(),
        display(dataset)
    );
    for (rank, hit) in result.hits.iter().enumerate() {
        let document = index.document(hit);
        println!(
            "  [{}] {}  score {:.4}  {}",
            rank + 1,
            document.id,
            hit.score,
            retrieve::preview(&document.text, PREVIEW_CHARS)
        );
    }
    let coverage = &result.coverage;
    println!(
        "keywords: {} of {} covered (ratio {:.2}, threshold {:.2})",
        coverage.covered.len(),
        coverage.keywords.len(),
        coverage.ratio,
        coverage.threshold
    );
    for (keyword, word) in coverage.keywords.iter().zip(&coverage.words) {
        let state = if coverage.covered.contains(keyword) {
            "covered"
        } else {
            "missing"
        };
        // The analyzed term is what is matched; show the question's word when it differs.
        if word.to_lowercase() == *keyword {
            println!("  {state:<8} {keyword}");
        } else {
            println!("  {state:<8} {keyword} ({word})");
        }
    }
}

/// The loaded model, the system prompt and the sampling options of `generate`/`chat`.
struct Session {
    generator: Generator,
    system: Option<String>,
    options: SamplingOptions,
    stats: bool,
}

/// A path argument as the user means it: relative to the workspace (`--workspace`, else
/// the current directory, where run outputs such as `runs/latest/…` live), or, when
/// nothing is there, relative to the current directory.
fn in_workspace(path: &Path, workspace: &Workspace) -> PathBuf {
    let inside = workspace.root.join(path);
    match path.is_relative() && inside.exists() {
        true => inside,
        false => path.to_path_buf(),
    }
}

impl Session {
    fn open(args: &ModelArgs, workspace: &Workspace) -> anyhow::Result<Session> {
        let options = SamplingOptions {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            max_new_tokens: args.max_new_tokens,
        };
        options.validate()?;
        let system = match &args.system_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?
                    .trim_end()
                    .to_string(),
            ),
            None => args.system.clone(),
        };
        let model = in_workspace(&args.model, workspace);
        let device = args.device.device().map_err(anyhow::Error::msg)?;
        let generator = Generator::load_with(&model, &device, args.bf16_weights)?;
        Ok(Session {
            generator,
            system,
            options,
            stats: args.stats,
        })
    }

    /// Prints the end of an answer (a newline) and, with `--stats`, its statistics.
    fn finish(&self, generation: &Generation) -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout)?;
        stdout.flush()?;
        if self.stats {
            eprintln!("{}", generation.stats_line());
        }
        Ok(())
    }
}

/// Writes each streamed piece to standard output at once.
fn print_piece(piece: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(piece.as_bytes())?;
    stdout.flush()
}

fn generate(args: GenerateArgs, workspace: &Workspace) -> anyhow::Result<ExitCode> {
    let session = Session::open(&args.model, workspace)?;
    let generator = &session.generator;
    let generation = if args.raw {
        let prompt = generator.raw_prompt(&args.prompt)?;
        generator.generate(&prompt, &session.options, &mut print_piece)?
    } else {
        let conversation = Conversation::new(session.system.clone());
        let prompt = generator.chat_prompt(&conversation.prompt_messages(&args.prompt))?;
        generator.generate(&prompt, &session.options, &mut print_piece)?
    };
    session.finish(&generation)?;
    Ok(ExitCode::SUCCESS)
}

fn chat_command(args: ChatArgs, workspace: &Workspace) -> anyhow::Result<ExitCode> {
    let session = Session::open(&args.model, workspace)?;
    let index = match &args.retrieve {
        Some(dataset) => Some(Index::open(&in_workspace(dataset, workspace))?),
        None => None,
    };
    let mut conversation = Conversation::new(session.system.clone());
    // Ok(false): retrieval refused to answer.
    let answer = |conversation: &mut Conversation, text: &str| -> anyhow::Result<bool> {
        let prompt = match &index {
            None => text.to_string(),
            Some(index) => match retrieval_prompt(index, &args, text) {
                Ok(prompt) => prompt,
                Err(refusal) => {
                    println!("I can't answer that from the documents: {refusal}");
                    return Ok(false);
                }
            },
        };
        let reply = conversation.reply(
            &session.generator,
            &prompt,
            &session.options,
            &mut print_piece,
        )?;
        session.finish(&reply.generation)?;
        if reply.forgotten_turns > 0 {
            eprintln!(
                "(the oldest {} exchange(s) were dropped to fit the model's context)",
                reply.forgotten_turns
            );
        }
        Ok(true)
    };
    if let Some(prompt) = &args.prompt {
        // A refusal in one-shot use exits 1, as `verify-question` does.
        return Ok(match answer(&mut conversation, prompt)? {
            true => ExitCode::SUCCESS,
            false => ExitCode::from(1),
        });
    }
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!(
            "chatting with {} — /reset clears the history, /exit or Ctrl-D quits",
            args.model.model.display()
        );
    }
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                conversation.reset();
                eprintln!("(history cleared)");
            }
            _ => {
                answer(&mut conversation, text)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn audit_command(args: &AuditArgs, workspace: &Workspace) -> anyhow::Result<ExitCode> {
    // A relative path is taken from the current directory, else from --workspace.
    let mut run_dir = args.run_dir.clone();
    if run_dir.is_relative() && !run_dir.exists() && workspace.root.join(&run_dir).exists() {
        run_dir = workspace.root.join(&run_dir);
    }
    let run = audit::Run::open(&run_dir)?;
    let report = audit::audit(&run);
    if !args.json {
        print!("{report}");
    }
    let reproduction = if args.reproduce {
        let cancel = CancelFlag::new();
        cancel.install_signal_handlers()?;
        let options = ReproduceOptions {
            into: args.into.clone(),
            jobs: args.jobs,
            progress: !args.json,
            command_line: std::env::args().collect(),
        };
        let reproduction = audit::reproduce(&run, &options, &cancel)?;
        if !args.json {
            print!("{reproduction}");
        }
        Some(reproduction)
    } else {
        None
    };
    let passed = report.passed()
        && reproduction
            .as_ref()
            .is_none_or(|reproduction| reproduction.passed());
    if args.json {
        let document = serde_json::json!({
            "audit": report,
            "reproduction": reproduction,
            "passed": passed,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
    }
    Ok(
        if reproduction
            .as_ref()
            .is_some_and(|reproduction| reproduction.interrupted)
        {
            ExitCode::from(EXIT_INTERRUPTED)
        } else if passed {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

fn run(mut args: RunArgs, workspace: &Workspace) -> anyhow::Result<ExitCode> {
    if let Some(executor) = args.executor {
        let kind = match executor {
            ExecutorFlag::Local => "local",
            ExecutorFlag::Slurm => "slurm",
        };
        args.pipeline.set.push(format!("executor.kind={kind}"));
    }
    let pipeline = load(&args.pipeline, workspace)?;
    if args.detach && pipeline.executor.kind != config::ExecutorKind::Slurm {
        anyhow::bail!(
            "--detach needs the Slurm executor (--executor slurm, or `executor: {{ kind: slurm }}`)"
        );
    }
    let dag = dag::build(&pipeline)?;
    let cancel = CancelFlag::new();
    cancel.install_signal_handlers()?;
    let options = RunOptions {
        force: args.selection.force,
        force_all: args.selection.force_all,
        only: args.selection.only,
        until: args.selection.until,
        dry_run: args.dry_run,
        jobs: args.jobs,
        keep_going: args.selection.keep_going,
        wait_for_lock: !args.no_wait,
        resume: !args.selection.no_resume,
        verify: args.selection.verify,
        progress: !args.dry_run,
        progress_every: (args.progress_every > 0)
            .then(|| std::time::Duration::from_secs(args.progress_every)),
        command_line: std::env::args().collect(),
        detach: args.detach,
    };
    print_header(&pipeline);
    let report = executor::run(workspace, &pipeline, &dag, &options, &cancel)?;
    if args.dry_run {
        print_report(&report.stages, &pipeline);
    }
    let executed = report.with_status(StageStatus::Executed).len();
    let cached = report.with_status(StageStatus::Cached).len();
    let submitted = report.with_status(StageStatus::Submitted).len();
    if let Some(run_dir) = &report.run_dir {
        let shown = run_dir.strip_prefix(&workspace.root).unwrap_or(run_dir);
        if submitted > 0 {
            crate::console::line(format_args!(
                "{submitted} submitted to Slurm, {cached} cached; run recorded in {} (`trainyard status` follows the jobs)",
                shown.display()
            ));
        } else {
            crate::console::line(format_args!(
                "{executed} executed, {cached} cached; run recorded in {}",
                shown.display()
            ));
        }
    }
    for stage in &report.stages {
        if stage.status == StageStatus::Failed
            && let Some(error) = &stage.error
        {
            crate::console::line(format_args!(
                "error: stage `{}` ({}) failed: {error}",
                stage.name, stage.kind
            ));
        }
    }
    let code = match report.outcome {
        RunStatus::Succeeded | RunStatus::Running => ExitCode::SUCCESS,
        RunStatus::Failed => ExitCode::FAILURE,
        RunStatus::Interrupted => ExitCode::from(EXIT_INTERRUPTED),
    };
    left_for_exit((pipeline, dag, report));
    Ok(code)
}

/// `trainyard exec-stage JOB`: exit 0 when the stage is in the store (or its job was
/// requeued to resume), 1 when it failed, 130 when it was stopped.
fn exec_stage_command(workspace: &Workspace, job: &str) -> anyhow::Result<ExitCode> {
    let cancel = CancelFlag::new();
    cancel.install_signal_handlers()?;
    // Slurm's warning before the time limit (`--signal=B:USR1@N`): checkpoint, requeue.
    let requeue = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, requeue.clone())?;
    cancel.cancel_on(signal_hook::consts::SIGUSR1)?;
    let outcome = executor::slurm::exec_stage(workspace, job, &cancel, &requeue)?;
    Ok(match outcome {
        executor::slurm::ExecOutcome::Done | executor::slurm::ExecOutcome::Requeued => {
            ExitCode::SUCCESS
        }
        executor::slurm::ExecOutcome::Failed => ExitCode::FAILURE,
        executor::slurm::ExecOutcome::Interrupted => ExitCode::from(EXIT_INTERRUPTED),
    })
}

/// The Slurm jobs of runs submitted with `--detach` (or whose submitter was killed)
/// whose records are not complete yet.
fn print_unfollowed_slurm_runs(workspace: &Workspace) {
    for (run_id, jobs) in executor::slurm::unfollowed_status(workspace) {
        crate::console::line(format_args!("Slurm run {run_id}:"));
        let width = jobs.iter().map(|job| job.stage.len()).max().unwrap_or(0);
        for job in jobs {
            crate::console::line(format_args!(
                "  {:<width$}  job {:<8} {}{}",
                job.stage,
                job.job_id,
                job.state.to_lowercase(),
                job.node
                    .map(|node| format!(" on {node}"))
                    .unwrap_or_default()
            ));
        }
    }
}

/// Leaves `value` to the end of the process instead of freeing it: the command is about
/// to exit, and freeing the pipeline, graph and reports of 10,000 stages one allocation
/// at a time took 6% of a no-op run. Only for values that own nothing but memory.
fn left_for_exit<T>(value: T) {
    std::mem::forget(value);
}

fn print_header(pipeline: &ResolvedPipeline) {
    let profiles: Vec<&str> = pipeline
        .profiles
        .iter()
        .map(|profile| profile.name.as_str())
        .collect();
    let profiles = if profiles.is_empty() {
        String::new()
    } else {
        format!(", profile {}", profiles.join(","))
    };
    crate::console::line(format_args!(
        "pipeline {} ({}{profiles})",
        pipeline.name,
        display(&pipeline.file.path)
    ));
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn print_report(stages: &[executor::StageReport], pipeline: &ResolvedPipeline) {
    let width = stages
        .iter()
        .map(|stage| stage.name.len())
        .max()
        .unwrap_or(0);
    for stage in stages {
        let fingerprint = stage
            .fingerprint
            .as_deref()
            .map(|fp| &fp[..12])
            .unwrap_or("");
        println!(
            "  {:<9} {:<width$}  {:<12} {fingerprint}",
            stage.status.as_str(),
            stage.name,
            format!("({})", stage.kind)
        );
        for reason in &stage.reasons {
            let origin = match reason {
                crate::fingerprint::Reason::SettingChanged { key, .. } => pipeline
                    .origins
                    .get(&format!("stages.{}.with.{key}", stage.name))
                    .map(|origin| format!("   [{origin}]"))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            println!("  {:<9} {:<width$}    - {reason}{origin}", "", "");
        }
        if let Some(error) = &stage.error {
            println!("  {:<9} {:<width$}    ! {error}", "", "");
        }
    }
}

fn print_resolved(pipeline: &ResolvedPipeline) {
    let mut leaves = Vec::new();
    flatten("", &pipeline.values_json(), &mut leaves);
    let width = leaves
        .iter()
        .map(|(key, value)| key.len() + value.len() + 3)
        .max()
        .unwrap_or(0);
    for (key, value) in leaves {
        let origin = pipeline
            .origins
            .get(&key)
            .map(ToString::to_string)
            .unwrap_or_else(|| "default".to_string());
        let line = format!("{key} = {value}");
        println!("{line:<width$}  # {origin}");
    }
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, child, out);
            }
        }
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

fn submit_command(args: SubmitArgs, workspace: &Workspace) -> anyhow::Result<ExitCode> {
    let file = &args.pipeline.file;
    let pipeline = if file.is_absolute() {
        file.clone()
    } else {
        std::env::current_dir()?.join(file)
    };
    let root = workspace.root.canonicalize()?;
    let pipeline = pipeline
        .canonicalize()
        .map_err(|error| anyhow::anyhow!("{}: {error}", file.display()))?;
    let relative = pipeline.strip_prefix(&root).map_err(|_| {
        anyhow::anyhow!(
            "{} is outside the workspace {}: a job's pipeline must live inside it",
            file.display(),
            root.display()
        )
    })?;
    let spec = crate::serve::queue::JobSpec {
        pipeline: relative.to_string_lossy().into_owned(),
        profiles: args.pipeline.profile,
        set: args.pipeline.set,
        force: args.selection.force,
        force_all: args.selection.force_all,
        only: args.selection.only,
        until: args.selection.until,
        keep_going: args.selection.keep_going,
        no_resume: args.selection.no_resume,
        verify: args.selection.verify,
        retries: args.retries,
    };
    let queue = crate::serve::queue::Queue::open(&workspace.root)?;
    let id = queue.submit(&spec)?;
    println!("{id}");
    Ok(ExitCode::SUCCESS)
}

fn jobs_command(
    workspace: &Workspace,
    state: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use crate::serve::queue::{JobState, Queue};
    let filter = match state {
        Some(name) => Some(JobState::parse(name).ok_or_else(|| {
            anyhow::anyhow!(
                "--state {name}: expected queued, running, succeeded, failed or cancelled"
            )
        })?),
        None => None,
    };
    let jobs = Queue::open(&workspace.root)?.list(filter)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:>5}  {:<10}  {:<24}  pipeline", "id", "state", "last run");
    for job in jobs {
        let profiles = if job.spec.profiles.is_empty() {
            String::new()
        } else {
            format!(" --profile {}", job.spec.profiles.join(","))
        };
        println!(
            "{:>5}  {:<10}  {:<24}  {}{profiles}",
            job.id,
            job.state.as_str(),
            job.runs.last().map_or("-", String::as_str),
            job.spec.pipeline
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `trainyard logs`: the events of a run, or of a job's latest run.
fn logs_command(workspace: &Workspace, target: &str, follow: bool) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let job = target
        .parse::<i64>()
        .ok()
        .map(|id| -> anyhow::Result<_> {
            Ok((id, crate::serve::queue::Queue::open(&workspace.root)?))
        })
        .transpose()?;
    let run_dir = |run: &str| -> std::path::PathBuf {
        let as_path = std::path::Path::new(run);
        if as_path.join("logs.jsonl").is_file() {
            as_path.to_path_buf()
        } else {
            workspace.runs_dir().join(run)
        }
    };
    let mut printed = 0usize;
    let mut current: Option<std::path::PathBuf> = None;
    loop {
        let (dir, over) = match &job {
            Some((id, queue)) => {
                let job = queue.get(*id)?;
                (
                    job.runs.last().map(|run| run_dir(run)),
                    job.state.is_final(),
                )
            }
            None => (Some(run_dir(target)), false),
        };
        if dir != current {
            current = dir.clone();
            printed = 0;
        }
        let mut finished = over;
        if let Some(dir) = &dir {
            let path = dir.join("logs.jsonl");
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(error) if job.is_none() => {
                    anyhow::bail!("{}: {error}", path.display())
                }
                Err(_) => String::new(),
            };
            let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
            let mut out = std::io::stdout().lock();
            for line in complete.lines().skip(printed) {
                writeln!(out, "{line}")?;
                printed += 1;
                if job.is_none() && line.contains("\"run_finished\"") {
                    finished = true;
                }
            }
            out.flush()?;
        }
        if !follow || finished {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}
