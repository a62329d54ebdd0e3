//! The `ferry` command: argument parsing and exit codes only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ferry::config::{Config, VerifyMode};
use ferry::import::{Ended, ImportArgs};
use ferry::push::{self, PushOptions};
use ferry::shutdown;

/// Exit status when every destination verified.
const EXIT_OK: u8 = 0;
/// Exit status when at least one destination failed.
const EXIT_FAILED: u8 = 1;
/// Exit status when the input was refused before a byte was sent.
const EXIT_REFUSED: u8 = 2;
/// Exit status of a push stopped by SIGINT or SIGTERM (128 + SIGINT, as a shell reports Ctrl-C).
const EXIT_INTERRUPTED: u8 = 130;

/// The ENVIRONMENT section every command's help shares.
macro_rules! ENVIRONMENT {
    () => {
        "ENVIRONMENT:\n  FERRY_LOG              log filter (default: info), e.g. FERRY_LOG=debug or\n                         FERRY_LOG=info,ferry=debug\n  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN\n                         credentials of s3:// destinations that set none in the config;\n                         with none at all a destination is refused (exit 2), unless its\n                         table says credentials = \"instance\" (the cloud instance's role)\n  AWS_ENDPOINT_URL, AWS_REGION\n                         endpoint and region of s3:// destinations that set none\n                         (default region: us-east-1)\n  OCI_CLI_CONFIG_FILE, OCI_CLI_PROFILE\n                         the OCI CLI config file and profile whose API key signs for\n                         oci:// destinations that set none (default: ~/.oci/config,\n                         DEFAULT), as the OCI CLI reads them"
    };
}

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Move VM disk images into object storage, to every region at once, every byte checked.",
    long_about = "ferry reads a disk image once and streams it as parallel multipart uploads to every \
destination (OCI Object Storage or any S3-compatible store, or a local directory) at the same time. \
Each part carries a CRC32C computed as it is read; each object is verified after completion, and an \
import manifest (<name>.manifest.json) is written beside it.\n\n\
Without --config, ferry uses its embedded default (config/ferry.toml in the source): a spool in \
./spool and two file:// destinations under ./var/regions/.",
    after_help = concat!(
        "EXIT STATUS (each command's --help has its own):\n  0    done: every destination verified (push), stopped cleanly (daemon), importable (inspect)\n  1    at least one destination failed (push), or a file could not be read (inspect)\n  2    refused before sending: bad arguments, config, file or destination\n  130  interrupted by SIGINT or SIGTERM (push), or a second signal (daemon)\n\n",
        ENVIRONMENT!()
    )
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch the spool and ship every complete image to every destination.
    #[command(
        long_about = "Watch spool_dir and ship every complete image to every configured destination, \
each exactly once, resuming after crashes and restarts.\n\n\
A producer writes X.partial and renames it to X when complete, or writes X and then creates an \
empty X.ready; a file that arrives any other way is taken once its size and mtime have been still \
for settle_secs. X.meta.json beside X is its sidecar. Claimed files move to spool/.ferry/active/, \
then to .ferry/done/ (or are deleted, on_success = \"delete\") once every destination verified them \
(and, for a destination with an import table, once the custom image made from it is AVAILABLE), \
or to .ferry/failed/ with X.error.json saying why.",
        after_help = concat!(
            "EXIT STATUS:\n  0    stopped by SIGTERM or SIGINT after jobs reached a resumable point\n  1    the process could not start its runtime\n  2    did not start: the config, a destination (e.g. s3:// without credentials),\n       the state directory, the spool, the metrics port, or another daemon holding\n       the same state directory or spool (its pid is named)\n  130  a second signal: exited at once; the journal on disk is whole\n\n",
            "SIGNALS:\n  SIGTERM, SIGINT  stop taking files; in-flight parts finish (shutdown_timeout_secs); exit 0.\n                   A second signal exits at once; the journal stays consistent.\n  SIGHUP           reload the config: destinations and limits apply to new jobs;\n                   a bad config is refused in the log and the old one kept.\n\n",
            "FILES:\n  --config FILE, or the embedded default (config/ferry.toml in the source)\n  SPOOL/X, SPOOL/X.meta.json     an image and its sidecar (licence attestation, OS,\n                                 launch mode: see ferry inspect --help)\n  SPOOL/X.ready                  optional: X is complete, take it now\n  SPOOL/.ferry/active/           images being shipped (resumed after a restart)\n  SPOOL/.ferry/done/             images every destination verified (on_success = \"move\")\n  SPOOL/.ferry/failed/X.error.json  why X was refused or failed, and what to do\n  SPOOL/.ferry/daemon.lock, STATE/daemon.lock   one daemon per spool and state directory\n  STATE/jobs/*.json              the journal: upload ids and parts sent, per job\n  STATE/last-success.json        when each destination last verified an object\n  DEST/X, DEST/X.manifest.json   the image and its manifest, in every destination\n\n",
            "ENDPOINTS (on metrics_addr, default 127.0.0.1:9465):\n  /metrics   Prometheus text format; every series exists from the start\n  /healthz   200 while the process serves\n  /readyz    200 when spool, state directory and every destination are usable;\n             else 503, one line per problem\n  /status    JSON: jobs in flight, the waiting queue and why each waits, retries,\n             recent errors, each destination's last probe\n\n",
            ENVIRONMENT!(),
            "\n  NOTIFY_SOCKET, WATCHDOG_USEC  set by systemd (Type=notify): READY, STATUS and watchdog pings\n\n",
            "EXAMPLE (as written, in an empty directory; needs qemu-img):\n",
            "  ferry daemon       # the embedded default: ./spool -> ./var/regions/*\n",
            "  # another terminal, same directory: a first image, with a boot signature\n",
            "  truncate -s 64M disk.raw\n",
            "  printf '\\125\\252' | dd of=disk.raw bs=1 seek=510 conv=notrunc status=none\n",
            "  qemu-img convert -f raw -O qcow2 disk.raw disk.qcow2 && rm disk.raw\n",
            "  # its sidecar: the licence attestation the daemon requires, yours, now\n",
            "  cat > spool/disk.qcow2.meta.json <<JSON\n",
            "{\"license\": {\"model\": \"BYOL\", \"attested_by\": \"$(id -un)\",\n",
            " \"attested_at\": \"$(date -Iseconds)\",\n",
            " \"statement\": \"It complies with the licences of its OS and software.\"}}\n",
            "JSON\n",
            "  # the image: under a temporary name, renamed in when complete\n",
            "  cp disk.qcow2 spool/disk.qcow2.partial\n",
            "  mv spool/disk.qcow2.partial spool/disk.qcow2"
        )
    )]
    Daemon {
        /// Config file (TOML). Default: the embedded config/ferry.toml.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Upload one image to every destination at once and verify it.
    #[command(
        long_about = "Upload IMAGE to every destination in the config, or to those given with --to, \
all at the same time. The object key is IMAGE's base name under each destination's prefix; \
<name>.manifest.json is written beside it once the object verified.\n\n\
IMAGE may be an object in a bucket (s3://BUCKET/KEY, oci://BUCKET/KEY), such as an image OCI \
exported: it is read once, by parallel ranged GETs pinned to the ETag it had when the push began, \
inspected through the same reads, and each part goes to every destination. Where its store keeps \
the whole object's CRC32C (OCI always for its uploads with CRC32C; S3 with a full-object \
x-amz-checksum-crc32c), the parts read must combine to it before any destination completes (a \
part damaged on the way is read again); the manifest's `source` says what it was checked against.\n\n\
Where a destination has an import table ([destinations.NAME.import]), each object that verified \
there is then imported as a custom image in its region, and the push waits until the image is \
AVAILABLE (see ferry import --help); --no-import leaves that to a later `ferry import`. An image \
without a basis for its launch mode is refused before a byte is sent when an import is asked.",
        after_help = concat!("EXIT STATUS:\n  0    every destination verified (and every import asked ended AVAILABLE)\n  1    at least one destination or import failed (a line says which and why)\n  2    refused before a byte was sent\n  130  interrupted\n\n",
            ENVIRONMENT!(),
            "\n\n\
SIGNALS:\n  SIGINT, SIGTERM  stop: uploads not yet complete are aborted (nothing is left half-written);\n                   destinations that verified keep their objects. A second signal exits at once.\n\n\
EXAMPLES:\n  ferry push disk.qcow2\n  ferry push disk.qcow2 --to phoenix --to s3://images-fra/exports/\n  ferry push oci://exports/web01.oci --to ashburn --to frankfurt   # from an export bucket\n  AWS_ENDPOINT_URL=http://127.0.0.1:8333 ferry push disk.vmdk --to s3://bucket/ --verify readback")
    )]
    Push {
        /// The image: a regular file (symlinks are refused), or an object in a bucket,
        /// s3://BUCKET/KEY or oci://BUCKET/KEY (read by ranged GETs, with the store
        /// settings of the [sources.NAME] table whose URL holds it).
        image: PathBuf,
        /// Config file (TOML). Default: the embedded config/ferry.toml.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// A destination name from the config, or a URL: file:///dir/, s3://bucket/prefix/,
        /// oci://bucket/prefix/, memory://name/. Repeat for several. Default: every
        /// configured destination.
        #[arg(long, value_name = "NAME|URL")]
        to: Vec<String>,
        /// Part size, e.g. 64MiB (raised to fit 10,000 parts, kept within 5 MiB..5 GiB).
        /// Default: the config's transfer.part_size (64MiB in the embedded config).
        #[arg(long, value_name = "SIZE")]
        part_size: Option<bytesize::ByteSize>,
        /// head: check size and part count; readback: re-read each object and compare CRC32C.
        /// Default: the config's transfer.verify (head in the embedded config).
        #[arg(long, value_name = "head|readback")]
        verify: Option<VerifyMode>,
        /// Seconds between progress lines when stderr is not a terminal.
        #[arg(long, value_name = "SECS", default_value_t = 5)]
        progress_secs: u64,
        /// Ship the file even if OCI could not import it (the manifest records the verdict).
        #[arg(long)]
        force: bool,
        /// Do not import verified objects as custom images, whatever the destinations'
        /// import tables say (`ferry import` does it later).
        #[arg(long)]
        no_import: bool,
        /// Serve /metrics, /healthz, /readyz and /status on ADDR during the push,
        /// e.g. 127.0.0.1:9465.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Convert an image OCI cannot import (raw, VHD, VHDX, VDI, QED, an OVA's disk)
        /// into QCOW2 with qemu-img first, check the QCOW2 with qemu-img compare, and ship
        /// it as STEM.qcow2, as policy.convert = true does. The QCOW2 is written under
        /// state_dir/convert/ (free space for the disk's virtual size is checked first)
        /// and removed when the push ends.
        #[arg(long)]
        convert: bool,
        /// Limit this push to RATE bytes per second, all destinations together, instead
        /// of transfer.bandwidth_limit: e.g. 20MiB, off, or a timetable in rclone's
        /// form, "08:00,20MiB 19:00,off" (local time; days too: "Mon-08:00,20MiB").
        /// Each destination's own bandwidth_limit still applies.
        #[arg(long, value_name = "RATE|TIMETABLE")]
        bwlimit: Option<ferry::bandwidth::Schedule>,
    },
    /// Say what an image is and whether OCI can import it, without sending anything.
    #[command(
        long_about = "Read IMAGE's headers (QCOW2, VMDK, .oci; VHD, VHDX, VDI, raw and others are \
recognised and refused by name) and say whether OCI's importer would take it: format, virtual size, \
verdict, the reasons for a refusal and the warnings, the boot sector, and the launch mode and firmware \
with the basis each rests on. IMAGE.meta.json beside the image is read as its sidecar.",
        after_help = concat!(
            "EXIT STATUS:\n  0  importable\n  2  refused (the reasons say why and what to do)\n  1  could not read the file or its sidecar, or the sidecar is not valid\n\n",
            "SIDECAR:\n  IMAGE.meta.json beside the image (or --sidecar FILE) says what the bytes cannot.\n  JSON, at most 64 KiB; unknown keys are errors. Every key is optional, but the daemon\n  (and --daemon-policy) refuses an image without a licence attestation, \"license\":\n    os, os_version         the guest's OS and its version, as CreateImage should name them\n    launch_mode            NATIVE, PARAVIRTUALIZED or EMULATED\n    firmware               BIOS or UEFI_64\n    license.model          e.g. BYOL, LICENSE_INCLUDED, OPEN_SOURCE\n    license.attested_by    who attests that the image complies (a person or role)\n    license.attested_at    when, in RFC 3339 form (date -u +%FT%TZ prints one)\n    license.statement      what is attested, in words\n  A value still holding a template placeholder (\"<your OS>\") is refused: an\n  attestation copied from a template is not one. ferry daemon --help shows a sidecar\n  made for a test image.\n\n",
            "EXAMPLES:\n  ferry inspect disk.qcow2\n      disk.qcow2: QCOW2 v3, virtual size 64.0 MiB (67108864 bytes), file 384.0 KiB\n      verdict: ACCEPT (OCI can import it)\n      ...\n  ferry inspect --json --daemon-policy disk.qcow2   # as the daemon would judge it\n  ferry inspect disk.vhd                            # refused, with the conversion command"
        )
    )]
    Inspect {
        /// The image file, or an object: s3://BUCKET/KEY, oci://BUCKET/KEY.
        image: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Config file (for the [policy] table). Default: the embedded config.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Sidecar to read instead of IMAGE.meta.json.
        #[arg(long, value_name = "FILE")]
        sidecar: Option<PathBuf>,
        /// Apply the daemon's policy (a licence attestation is required).
        #[arg(long)]
        daemon_policy: bool,
    },
    /// Import an object ferry shipped as a custom image in its region, and wait for it.
    #[command(
        long_about = "Import an object that ferry shipped to OCI Object Storage (oci://) as a custom \
image in that bucket's region, from the manifest beside it, and wait until the image is AVAILABLE, \
with a progress line. TARGET is oci://BUCKET/PREFIX/NAME, or the path of a NAME.manifest.json.\n\n\
The destination is the configured one whose oci:// URL holds the object (its profile, region, \
endpoints and [destinations.NAME.import] table), or --destination; without one, the bucket in the \
region of the OCI CLI profile. Options given here override the table's keys; without a table, \
--compartment-id is needed.\n\n\
Before anything is created the object is checked against its manifest (its size, and the CRC32C \
OCI keeps of it): a changed object is refused. CreateImage gets the image's format \
(sourceImageType QCOW2 or VMDK, none for .oci), its operating system and a launch mode with a basis \
(.oci metadata, or the sidecar's attestation): an image without one is refused. The source is a \
read-only pre-authenticated request on the object, deleted when the import ends (or, with \
--source tuple, the namespace, bucket and object name). The manifest is written again with the \
image's OCID and how the import ended (and the manifest file, when TARGET is one). A manifest \
that says the object was imported already is not imported again without --again.",
        after_help = concat!(
            "EXIT STATUS:\n  0    the image is AVAILABLE (or was already)\n  1    the import ended otherwise (DISABLED, timeout, OCI refused it)\n  2    refused before an image was created: the manifest, the object, the table\n  130  interrupted: the image (if created) goes on importing in OCI\n\n",
            ENVIRONMENT!(),
            "\n\nEXAMPLES:\n  ferry import oci://images/exports/web01.qcow2\n  ferry import var/web01.qcow2.manifest.json --compartment-id ocid1.compartment.oc1..aaaa\n  ferry import oci://images/exports/web01.qcow2 --display-name '{stem}-{date}' --tag team=migration"
        )
    )]
    Import {
        /// oci://BUCKET/PREFIX/NAME of the object, or the path of its manifest file.
        target: String,
        /// Config file (TOML). Default: the embedded config/ferry.toml.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// The configured destination to import through. Default: the one whose URL holds the object.
        #[arg(long, value_name = "NAME")]
        destination: Option<String>,
        /// The compartment the image is created in (an OCID).
        #[arg(long, value_name = "OCID")]
        compartment_id: Option<String>,
        /// The image's name: a template of {stem}, {name}, {date}, {crc32c}. Default: the
        /// table's, else {stem}.
        #[arg(long, value_name = "TEMPLATE")]
        display_name: Option<String>,
        /// Where CreateImage reads the object: par (a read-only pre-authenticated request)
        /// or tuple (namespace, bucket and object name). Default: the table's, else par.
        #[arg(long, value_name = "par|tuple")]
        source: Option<ferry::config::ImportSource>,
        /// How long the pre-authenticated request lives (it is deleted when the import ends).
        /// Default: the destination's import table's, else 24.
        #[arg(long, value_name = "HOURS")]
        par_expiry_hours: Option<u64>,
        /// Give up waiting for AVAILABLE after this long. Default: the table's, else 120.
        #[arg(long, value_name = "MINUTES")]
        timeout_minutes: Option<u64>,
        /// A freeform tag for the image, KEY=VALUE; repeat for several.
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = key_value)]
        tags: Vec<(String, String)>,
        /// OCI Compute's endpoint. Default: the table's, else https://iaas.REGION.oraclecloud.com.
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        /// Import even when the manifest says the object was imported already.
        #[arg(long)]
        again: bool,
        /// Seconds between progress lines while the state stays the same.
        #[arg(long, value_name = "SECS", default_value_t = 10)]
        progress_secs: u64,
    },
    /// Show what a running daemon is doing: jobs, queue, errors, destinations.
    #[command(
        long_about = "Read /status from the daemon that serves the config's metrics_addr (127.0.0.1:9465 \
by default) and draw it: each job with a bar, bytes, rate and ETA per destination (and the import's \
state where there is one), the queue and why each file waits, jobs waiting to retry, the last errors, \
each destination's health, and the bandwidth limits in force. When nothing answers, one line says so.",
        after_help = "EXIT STATUS:\n  0  the daemon answered\n  1  nothing answered, or not ferry\n  2  bad arguments or config\n\n\
EXAMPLES:\n  ferry status                             # the embedded default's 127.0.0.1:9465\n  ferry status --config /etc/ferry/ferry.toml --watch\n  ferry status --json | jq '.jobs[].destinations[] | {name, eta_secs}'"
    )]
    Status {
        /// Config file whose metrics_addr the daemon serves. Default: the embedded config.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Ask this address instead of the config's metrics_addr, e.g. 127.0.0.1:9465.
        #[arg(long, value_name = "ADDR")]
        addr: Option<std::net::SocketAddr>,
        /// Redraw in place every --interval seconds until interrupted (Ctrl-C).
        #[arg(long, short = 'w')]
        watch: bool,
        /// Seconds between redraws with --watch.
        #[arg(long, value_name = "SECS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval: u64,
        /// Print /status's JSON as the daemon answered it.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
    },
    /// Write the man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    Assets {
        /// Where DIR/man/ferry.1, DIR/man/ferry-SUBCOMMAND.1, DIR/completions/ferry.bash
        /// and DIR/completions/_ferry (zsh) are written.
        dir: PathBuf,
    },
}

/// A `KEY=VALUE` argument.
fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    ExitCode::from(runtime.block_on(run(cli)))
}

async fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Status {
            config,
            addr,
            watch,
            interval,
            json,
        } => {
            let addr = match addr {
                Some(a) => a,
                None => match load_config(config.as_deref()) {
                    Ok(c) => c.metrics_addr,
                    Err(code) => return code,
                },
            };
            match ferry::view::show(addr, watch, Duration::from_secs(interval), json).await {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    eprintln!("ferry: {e}");
                    EXIT_FAILED
                }
            }
        }
        Command::Assets { dir } => match assets(&dir) {
            Ok(()) => EXIT_OK,
            Err(e) => {
                eprintln!("ferry: cannot write the assets into {}: {e}", dir.display());
                EXIT_FAILED
            }
        },
        Command::Inspect {
            image,
            json,
            config,
            sidecar,
            daemon_policy,
        } => inspect(&image, json, config.as_deref(), sidecar, daemon_policy).await,
        Command::Import {
            target,
            config,
            destination,
            compartment_id,
            display_name,
            source,
            par_expiry_hours,
            timeout_minutes,
            tags,
            endpoint,
            again,
            progress_secs,
        } => {
            let config = match load_config(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let stop = match stop_on_signals("ferry: interrupted (again to exit at once)") {
                Ok(s) => s,
                Err(code) => return code,
            };
            let args = ImportArgs {
                target,
                destination,
                compartment_id,
                display_name,
                source,
                par_expiry_hours,
                timeout_minutes,
                tags,
                endpoint,
                again,
                progress_every: Duration::from_secs(progress_secs),
            };
            match ferry::import::run_command(&config, args, stop).await {
                Ended::Imported(_) => EXIT_OK,
                Ended::Failed(e) => {
                    eprintln!("ferry: FAILED: {e}\nferry: {}", e.advice());
                    EXIT_FAILED
                }
                Ended::Refused(why) => {
                    eprintln!("ferry: refused: {why}");
                    EXIT_REFUSED
                }
                Ended::Interrupted(left) => {
                    eprintln!("ferry: interrupted: {left}");
                    EXIT_INTERRUPTED
                }
            }
        }
        Command::Daemon { config } => match ferry::daemon::run(config).await {
            Ok(()) => EXIT_OK,
            Err(e) => {
                eprintln!("ferry: {e}");
                EXIT_REFUSED
            }
        },
        Command::Push {
            image,
            config,
            to,
            part_size,
            verify,
            progress_secs,
            force,
            no_import,
            metrics_addr,
            convert,
            bwlimit,
        } => {
            let config = match load_config(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let opts = PushOptions {
                to,
                part_size_bytes: part_size.map(|p| p.as_u64()),
                verify,
                force,
                no_import,
                convert,
                bandwidth_limit: bwlimit,
            };
            let status = match metrics_addr {
                Some(addr) => match push::serve_status(addr).await {
                    Ok((st, bound)) => {
                        eprintln!("ferry: serving http://{bound}/metrics");
                        Some(st)
                    }
                    Err(e) => {
                        eprintln!("ferry: cannot serve metrics on {addr}: {e}");
                        return EXIT_REFUSED;
                    }
                },
                None => None,
            };
            let stop = match stop_on_signals(
                "ferry: interrupted; aborting the uploads not yet complete (again to exit at once)",
            ) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let every = Duration::from_secs(progress_secs.max(1));
            let pushed = match push::push(&config, &image, opts, every, status, stop.clone()).await
            {
                Ok(o) => o,
                Err(ferry::transfer::PrepareError::Stopped) => {
                    eprintln!("ferry: interrupted before a byte was sent");
                    return EXIT_INTERRUPTED;
                }
                Err(e @ ferry::transfer::PrepareError::Convert(_)) => {
                    eprintln!("ferry: {e}\nferry: {}", e.advice());
                    return EXIT_REFUSED;
                }
                Err(e) => {
                    eprintln!("ferry: {e}");
                    return EXIT_REFUSED;
                }
            };
            match push::report(&pushed, stop.is_requested()) {
                push::Ended::Verified => EXIT_OK,
                push::Ended::Failed => EXIT_FAILED,
                push::Ended::Interrupted => EXIT_INTERRUPTED,
            }
        }
    }
}

/// The report on the object at `url`, by ranged reads, with its sidecar
/// from the bucket or `sidecar`.
async fn inspect_object(
    config: &Config,
    url: &str,
    sidecar: Option<&std::path::Path>,
    policy: &ferry::image::Policy,
) -> Result<ferry::image::Report, String> {
    let opened = ferry::store::open_object(
        url,
        &config.source_store(url),
        &config.transfer,
        ferry::transfer::SIDECAR_BESIDE,
    )
    .await
    .map_err(|e| e.to_string())?;
    let side = match sidecar {
        Some(p) => Some((
            p.display().to_string(),
            std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => opened.sidecar,
    };
    ferry::transfer::object_report(&opened.source, side, policy)
        .await
        .map_err(|e| e.to_string())
}

/// The man pages (clap_mangen: one for ferry, one per subcommand) and the
/// bash and zsh completions (clap_complete), made from this very CLI so that
/// they never drift from `--help`.
fn assets(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(Cli::command(), &man)?;
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh] {
        clap_complete::generate_to(shell, &mut Cli::command(), "ferry", &completions)?;
    }
    Ok(())
}

/// The config file, or the embedded default; a refusal's exit status.
fn load_config(path: Option<&std::path::Path>) -> Result<Config, u8> {
    Config::load_or_embedded(path).map_err(|e| {
        eprintln!("ferry: {e}");
        EXIT_REFUSED
    })
}

/// A stop token that SIGINT and SIGTERM trip, saying `first` the first
/// time (a second signal exits at once).
fn stop_on_signals(first: &'static str) -> Result<shutdown::Shutdown, u8> {
    let (trigger, stop) = shutdown::new();
    shutdown::on_signals(trigger, move || eprintln!("{first}")).map_err(|e| {
        eprintln!("ferry: cannot install signal handlers: {e}");
        EXIT_FAILED
    })?;
    Ok(stop)
}

async fn inspect(
    image: &std::path::Path,
    json: bool,
    config: Option<&std::path::Path>,
    sidecar: Option<PathBuf>,
    daemon_policy: bool,
) -> u8 {
    let config = match Config::load_or_embedded(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry: {e}");
            return EXIT_FAILED;
        }
    };
    let policy = ferry::image::Policy::from_config(&config.policy, daemon_policy);
    let report = match push::object_url(image) {
        Some(url) => inspect_object(&config, url, sidecar.as_deref(), &policy).await,
        None => {
            let sidecar = sidecar.or_else(|| {
                let p = ferry::image::sidecar::path_of(image);
                p.exists().then_some(p)
            });
            ferry::image::inspect(image, sidecar.as_deref(), &policy).map_err(|e| e.to_string())
        }
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry: {e}");
            return EXIT_FAILED;
        }
    };
    let convertible = match push::object_url(image) {
        None => ferry::image::convert::Input::of(&report, image, &policy),
        Some(_) => None,
    };
    if json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        if let Some(i) = &convertible {
            v["with_convert"] = serde_json::json!({
                "converted_from": i.format,
                "object_name": i.object_name,
            });
        }
        match serde_json::to_string_pretty(&v) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("ferry: {e}");
                return EXIT_FAILED;
            }
        }
    } else {
        print!("{}", ferry::image::describe(&report));
        if let Some(i) = &convertible {
            println!(
                "with convert = true (or ferry push --convert): converted to QCOW2 by qemu-img, compared with qemu-img compare, inspected again, and shipped as {}",
                i.object_name
            );
        }
    }
    match report.verdict {
        ferry::image::Verdict::Accept => EXIT_OK,
        ferry::image::Verdict::Refuse => EXIT_REFUSED,
    }
}
