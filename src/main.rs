//! The `headroom` command line: run the gateway, check a config, make a development certificate,
//! or run the mock backend.

#![warn(clippy::too_many_lines)]

use clap::{Parser, Subcommand};
use headroom::config::{units::parse_duration, Config, Source};
use headroom::mock::MockOptions;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod allocator;

// The proxy allocates small, short-lived objects per request (headers, bodies, futures) across
// threads; mimalloc's per-thread free lists serve that pattern better than the system allocator.
#[global_allocator]
static ALLOC: allocator::Allocator = allocator::Allocator;

/// After a reload or backend change, returns the freed pages of the calling thread's heap to the
/// system: mimalloc purges lazily, on later allocations, and a reloader that goes quiet would
/// keep the reload's transient memory resident.
fn release_memory() {
    // SAFETY: mi_collect only walks and purges the calling thread's mimalloc heap.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[derive(Parser)]
#[command(name = "headroom", version, about = "An elastic L7 gateway for AI model-serving backends")]
struct Cli {
    /// Config file [default: config/headroom.toml when it exists here, else the embedded default].
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Log line format (the access log included): text or json.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and print a one-line summary (exit 0), or the error (exit 1).
    Check {
        /// Config file [default: config/headroom.toml when it exists here, else the embedded default].
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Write a self-signed development certificate and key (dev.crt, dev.key).
    GenCert {
        /// Directory to write them to.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Names and IP addresses the certificate is valid for, comma-separated.
        #[arg(long, default_value = "localhost,127.0.0.1,::1", value_delimiter = ',')]
        names: Vec<String>,
        /// Replace dev.crt and dev.key when they exist.
        #[arg(long)]
        force: bool,
    },
    /// Load-test an endpoint: open loop (--rate) or closed loop (--concurrency), SSE-aware.
    Load {
        #[command(flatten)]
        args: LoadArgs,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Write latency and throughput over time as an SVG chart.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Run the built-in mock inference server.
    MockBackend(MockArgs),
}

/// The `mock-backend` command's arguments.
#[derive(clap::Args)]
struct MockArgs {
    /// Address to listen on, e.g. 127.0.0.1:9001.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Requests served at once; the rest queue FIFO.
    #[arg(long, default_value_t = 8)]
    capacity: usize,
    /// Time to first token.
    #[arg(long, default_value = "50ms", value_parser = duration)]
    ttft: Duration,
    /// Time between tokens.
    #[arg(long, default_value = "20ms", value_parser = duration)]
    token_interval: Duration,
    /// Tokens per completion.
    #[arg(long, default_value_t = 16)]
    tokens: u32,
    /// Share of requests answered with 500, 0..=1.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// The models served, comma-separated: listed by /v1/models; a request naming another gets
    /// 404, as vLLM answers. Default: one model, "mock-model", and any name accepted.
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Prompt blocks the prefix cache holds (0: no cache).
    #[arg(long, default_value_t = 0)]
    prefix_cache_blocks: usize,
    /// Bytes of prompt text per cached block (headroom's block_chars).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    block_chars: u64,
    /// Prefill time per uncached prompt token (about 4 bytes of prompt each).
    #[arg(long, default_value = "0s", value_parser = duration)]
    prefill_per_token: Duration,
    /// Log line format: text or json.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

impl MockArgs {
    fn options(&self) -> MockOptions {
        MockOptions {
            capacity: self.capacity,
            ttft: self.ttft,
            token_interval: self.token_interval,
            tokens: self.tokens,
            fail_rate: self.fail_rate,
            models: self.models.clone(),
            prefix_cache_blocks: self.prefix_cache_blocks,
            block_chars: self.block_chars as usize,
            prefill_per_token: self.prefill_per_token,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum WorkloadKind {
    SharedPrefix,
    MultiTurn,
}

/// The `load` command's arguments, checked into a plan by [`load_plan`].
#[derive(clap::Args)]
struct LoadArgs {
    /// URL to send to (http://).
    #[arg(default_value = "http://127.0.0.1:8080/v1/chat/completions")]
    url: String,
    /// Arrival rate, e.g. 50/s or 50 (open loop; the default is 10/s).
    #[arg(long, conflicts_with = "concurrency")]
    rate: Option<String>,
    /// Clients sending back to back (closed loop) instead of a rate.
    #[arg(long)]
    concurrency: Option<usize>,
    /// How long to send.
    #[arg(long, default_value = "30s", value_parser = duration)]
    duration: Duration,
    /// Grow the rate linearly from 0 over this time (open loop).
    #[arg(long, value_parser = duration)]
    ramp: Option<Duration>,
    /// Ask for a streamed (SSE) completion in the built-in request.
    #[arg(long)]
    stream: bool,
    /// Send this file as the request body instead of the built-in chat completion.
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// HTTP method.
    #[arg(long, default_value = "POST")]
    method: String,
    /// Extra request header, "Name: value" (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Model name in the built-in request.
    #[arg(long, default_value = "mock-model")]
    model: String,
    /// max_tokens in the built-in request.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Per-request limit.
    #[arg(long, default_value = "60s", value_parser = duration)]
    timeout: Duration,
    /// Open requests at most (open loop); beyond it, requests are dropped and counted.
    #[arg(long, default_value_t = 10_000)]
    max_inflight: usize,
    /// Prompts that change per request: shared-prefix (few long system prompts, many users) or
    /// multi-turn (conversations resending their history); streamed, with usage.
    #[arg(long, value_enum)]
    workload: Option<WorkloadKind>,
    /// shared-prefix: how many system prompts.
    #[arg(long, default_value_t = 16)]
    prefixes: usize,
    /// shared-prefix: bytes of each system prompt.
    #[arg(long, default_value_t = 8000)]
    prefix_chars: usize,
    /// shared-prefix: bytes of each request's own question.
    #[arg(long, default_value_t = 200)]
    suffix_chars: usize,
    /// multi-turn: conversations at once.
    #[arg(long, default_value_t = 64)]
    sessions: usize,
    /// multi-turn: turns per conversation.
    #[arg(long, default_value_t = 6)]
    turns: usize,
    /// Engines' metrics pages (comma-separated URLs), read before and after the run: their
    /// prefix-cache hit rate during it.
    #[arg(long, value_delimiter = ',')]
    engine_metrics: Vec<String>,
}

fn load_plan(a: LoadArgs) -> Result<headroom::load::Plan, String> {
    use headroom::load::workload::{Shape, Workload};
    use headroom::load::{Mode, Plan};
    let url: http::Uri = a.url.parse().map_err(|e| format!("{}: {e}", a.url))?;
    if url.scheme_str() != Some("http") || url.authority().is_none() {
        return Err(format!("{}: an http:// URL with a host is needed", a.url));
    }
    let mode = match (a.rate, a.concurrency) {
        (_, Some(0)) => return Err("--concurrency must be at least 1".into()),
        (_, Some(n)) => Mode::Concurrency(n),
        (rate, None) => {
            let text = rate.unwrap_or_else(|| "10/s".into());
            let per_second: f64 = text
                .trim_end_matches("/s")
                .trim()
                .parse()
                .map_err(|_| format!("--rate {text:?}: expected requests per second, e.g. 50/s"))?;
            if !(per_second > 0.0 && per_second <= 1_000_000.0) {
                return Err(format!("--rate {text:?}: must be above 0"));
            }
            Mode::Rate { per_second, ramp: a.ramp.unwrap_or_default() }
        }
    };
    let method: http::Method = a.method.parse().map_err(|_| format!("--method {:?} is not a method", a.method))?;
    let body = match &a.body_file {
        Some(p) => std::fs::read(p).map_err(|e| format!("--body-file {}: {e}", p.display()))?.into(),
        None if method == http::Method::GET || method == http::Method::HEAD => bytes::Bytes::new(),
        None => headroom::load::chat_body(&a.model, a.stream, a.max_tokens, "Say hello."),
    };
    let mut headers = Vec::new();
    for h in &a.headers {
        let (k, v) = h.split_once(':').ok_or_else(|| format!("--header {h:?}: expected \"Name: value\""))?;
        let name: http::HeaderName = k.trim().parse().map_err(|_| format!("--header {h:?}: bad name"))?;
        let value: http::HeaderValue = v.trim().parse().map_err(|_| format!("--header {h:?}: bad value"))?;
        headers.push((name, value));
    }
    if !body.is_empty() && !headers.iter().any(|(k, _)| k == http::header::CONTENT_TYPE) {
        headers.push((http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json")));
    }
    let workload = a.workload.map(|w| {
        let shape = match w {
            WorkloadKind::SharedPrefix => Shape::SharedPrefix {
                prefixes: a.prefixes.clamp(1, 1_000_000),
                prefix_chars: a.prefix_chars.min(1 << 24),
                suffix_chars: a.suffix_chars.min(1 << 24),
            },
            WorkloadKind::MultiTurn => {
                Shape::MultiTurn { sessions: a.sessions.clamp(1, 1_000_000), turns: a.turns.clamp(1, 1000) }
            }
        };
        std::sync::Arc::new(Workload { shape, model: a.model.clone(), max_tokens: a.max_tokens })
    });
    let mut engine_metrics = Vec::new();
    for u in &a.engine_metrics {
        let uri: http::Uri = u.parse().map_err(|e| format!("--engine-metrics {u}: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(format!("--engine-metrics {u}: an http:// URL with a host is needed"));
        }
        engine_metrics.push(uri);
    }
    Ok(Plan {
        url,
        method,
        headers,
        body,
        workload,
        engine_metrics,
        mode,
        duration: a.duration,
        timeout: a.timeout,
        max_inflight: a.max_inflight.max(1),
    })
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

/// Logs to stderr through a background writer thread, so no request ever waits on the terminal
/// or a pipe (if the writer falls 128k lines behind, lines are dropped rather than requests
/// slowed); the guard flushes what is left when it is dropped at exit. `RUST_LOG` filters
/// (default `info`; `RUST_LOG=info,access=off` turns the access log off).
fn init_logs(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) =
        tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(true).finish(std::io::stderr());
    // Colours only on a terminal: piped or collected logs stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

/// Worker threads: `[server] workers`, else `TOKIO_WORKER_THREADS`, else one per core.
fn worker_count(configured: Option<usize>) -> usize {
    configured
        .or_else(|| std::env::var("TOKIO_WORKER_THREADS").ok().and_then(|v| v.parse().ok()))
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1)
}

/// The main thread's runtime; more workers get their own (see `headroom::run_with_workers`).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// `server.state_dir`, when set, must be writable: said at once rather than at the first
/// registration.
fn state_dir_writable(config: &Config) -> Result<(), String> {
    match &config.server.state_dir {
        Some(dir) => headroom::scale::state::check_writable(dir)
            .map_err(|e| format!("server.state_dir: cannot write the state file there: {e}")),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => check(&Source::resolve(config.or(cli.config).as_deref())),
        Some(Command::GenCert { out, names, force }) => gen_cert(&out, &names, force),
        Some(Command::Load { args, json, plot }) => load(args, json, plot),
        Some(Command::MockBackend(args)) => {
            let _logs = init_logs(args.log_format);
            mock_backend(args.listen, args.options())
        }
        None => {
            let _logs = init_logs(cli.log_format);
            run(Source::resolve(cli.config.as_deref()))
        }
    }
}

/// `headroom check`: exit 0 with a summary line, or 1 with the error.
fn check(source: &Source) -> ExitCode {
    match source.load().map_err(|e| e.to_string()).and_then(|c| state_dir_writable(&c).map(|()| c)) {
        Ok(c) => {
            println!("{source}: ok: {}", c.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{e}");
            ExitCode::from(1)
        }
    }
}

/// `headroom gen-cert`.
fn gen_cert(out: &std::path::Path, names: &[String], force: bool) -> ExitCode {
    match headroom::tls::gen::write_dev_pair(out, names, force) {
        Ok((crt, key)) => {
            println!("wrote {} and {} (valid for {})", crt.display(), key.display(), names.join(", "));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen-cert: {e}");
            ExitCode::from(1)
        }
    }
}

/// `headroom load`: exit 0 when a request succeeded, 1 when none did, 64 on bad arguments.
fn load(args: LoadArgs, json: bool, plot: Option<PathBuf>) -> ExitCode {
    let plan = match load_plan(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::from(64);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let show = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (report, samples, elapsed) = rt.block_on(headroom::load::run_with_progress(&plan, show));
    if let Some(why) = &report.stopped_early {
        eprintln!("load: stopped early: {why}");
    }
    let text = if json { serde_json::to_string_pretty(&report).unwrap_or_default() + "\n" } else { report.table() };
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    if let Some(path) = plot {
        if let Err(e) = headroom::load::plot::write_svg(&path, &report.url, &samples, elapsed) {
            eprintln!("load: --plot: {e}");
            return ExitCode::from(1);
        }
    }
    if report.ok == 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// `headroom mock-backend`: serves until SIGTERM/SIGINT.
fn mock_backend(listen: std::net::SocketAddr, opts: MockOptions) -> ExitCode {
    if !(0.0..=1.0).contains(&opts.fail_rate) {
        eprintln!("--fail-rate must be between 0 and 1");
        return ExitCode::from(64);
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let capacity = opts.capacity;
    rt.block_on(async {
        match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => {
                tracing::info!(%listen, capacity, "mock backend listening");
                headroom::mock::serve(l, opts, headroom::shutdown_signal()).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cannot listen on {listen}: {e}");
                ExitCode::from(69)
            }
        }
    })
}

/// `headroom`: runs the gateway until SIGTERM/SIGINT (exit codes in README).
fn run(source: Source) -> ExitCode {
    tracing::info!(config = %source, version = env!("CARGO_PKG_VERSION"), "headroom starting");
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(64);
        }
    };
    if let Err(e) = state_dir_writable(&config) {
        eprintln!("{e}");
        return ExitCode::from(73);
    }
    headroom::reload::set_memory_release(release_memory);
    let workers = worker_count(config.server.workers);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    rt.block_on(async move {
        let listeners = match headroom::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(69);
            }
        };
        let options = headroom::RunOptions { workers, config_path: source.path().map(PathBuf::from) };
        match headroom::run_with(config, listeners, headroom::shutdown_signal(), options).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ headroom::RunError::DrainCut(_)) => {
                eprintln!("{e}");
                ExitCode::from(75)
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(70)
            }
        }
    })
}
