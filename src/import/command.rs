//! `ferry import`: an object already in a bucket becomes a custom image,
//! from its manifest (`oci://BUCKET/PREFIX/disk.qcow2`, or the manifest file).
//!
//! Promises: the object is checked against its manifest (size, and the
//! CRC32C OCI keeps) before anything is created, so a changed object is
//! never imported as the one that verified; an object whose manifest says
//! it was imported already is not imported again unless asked (`--again`);
//! each run makes at most one image (its retry token is its own).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Config, DestinationConfig, DestinationUrl, ImportConfig, ImportSource};
use crate::journal::ImportRecord;
use crate::manifest::{self, ImportEntry, Manifest};
use crate::shutdown::Shutdown;
use crate::store::Destination;

use super::{ImportError, ImportOutcome, ImportView, Importer, Watch, import_object};
use tracing::info;

/// What `ferry import` was asked, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct ImportArgs {
    /// `oci://BUCKET/KEY` of the object, or the path of its manifest file.
    pub target: String,
    /// The configured destination to import through (its profile, region,
    /// endpoints and import table); default: the one whose URL holds the object.
    pub destination: Option<String>,
    pub compartment_id: Option<String>,
    pub display_name: Option<String>,
    pub source: Option<ImportSource>,
    pub par_expiry_hours: Option<u64>,
    pub timeout_minutes: Option<u64>,
    /// Freeform tags added to (or replacing) the table's.
    pub tags: Vec<(String, String)>,
    /// Compute's endpoint.
    pub endpoint: Option<String>,
    /// Import even when the manifest says it was imported already.
    pub again: bool,
    /// The least time between two progress lines.
    pub progress_every: Duration,
}

/// How `ferry import` ended.
#[derive(Debug)]
pub enum Ended {
    /// AVAILABLE (or already, with `--again` not given): the image's OCID.
    Imported(String),
    /// The import ended otherwise; the manifest says how.
    Failed(ImportError),
    /// Refused before an image was created: the reason says what to do.
    Refused(String),
    /// Stopped by a signal: what it leaves behind, in words.
    Interrupted(String),
}

/// `ferry import`: finds the destination and the manifest, checks the object,
/// imports it and says how it ended (on stdout when it ended well, otherwise
/// on stderr).
pub async fn run_command(config: &Config, args: ImportArgs, cancel: Shutdown) -> Ended {
    let target = match Target::find(config, &args).await {
        Ok(t) => t,
        Err(why) => return Ended::Refused(why),
    };
    let Target {
        name,
        dest_cfg,
        dest,
        manifest: m,
        file,
    } = target;
    if let Some(done) = m.import.as_ref().filter(|i| i.outcome == "available")
        && !args.again
    {
        let id = done.image_id.clone().unwrap_or_default();
        println!(
            "{}: already imported in {} as {id} ({}, {}); --again imports it once more",
            m.file_name,
            done.region,
            done.state,
            done.finished_at.as_deref().unwrap_or("-")
        );
        return Ended::Imported(id);
    }
    if let Err(why) = check_object(&dest, &m).await {
        return Ended::Refused(why);
    }
    let table = match import_table(&dest_cfg, &args, &name) {
        Ok(t) => t,
        Err(why) => return Ended::Refused(why),
    };
    let importer = match Importer::new(&name, &dest_cfg, &table, &config.transfer) {
        Ok(i) => i,
        Err(e) => return Ended::Refused(e.to_string()),
    };
    eprintln!(
        "ferry: importing {} ({}) into compartment {} in {}",
        m.file_name,
        m.destination.object_url,
        table.compartment_id,
        importer.region(),
    );
    let file_name = m.file_name.clone();
    // A run of its own: its token is not an earlier run's.
    let salt = format!(
        "ferry import {}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let mut rec = importer.record(&m, &salt);
    // An import under way (the daemon's, or an interrupted `ferry import`):
    // wait for its image rather than make another.
    if !args.again
        && let Some(running) = continue_running(&mut rec, &m)
    {
        eprintln!(
            "ferry: {file_name} is being imported already, as image {} (begun {}): waiting for it; --again makes another",
            running.image_id.as_deref().unwrap_or("-"),
            running.started_at
        );
    }
    let watch = Lines {
        who: name.clone(),
        every: args.progress_every.max(Duration::from_secs(1)),
        last: Mutex::new(None),
        image: Mutex::new(None),
    };
    let ended = import_object(&dest, &importer, m, &mut rec, &watch, &cancel).await;
    // The manifest file given on the command line says what the bucket's says.
    if let (Some(path), Some(m)) = (&file, &ended.manifest)
        && let Err(e) = write_file(path, &m.to_json())
    {
        eprintln!("ferry: could not write {} again: {e}", path.display());
    }
    let entry = ended.manifest.as_ref().and_then(|m| m.import.clone());
    match (ended.result, entry) {
        (Ok(()), Some(i)) => {
            let id = i.image_id.clone().unwrap_or_default();
            println!(
                "imported {file_name} in {} as {id} ({}) in {}; its manifest says so",
                i.region,
                i.state,
                humantime::format_duration(Duration::from_secs(i.duration_secs.unwrap_or(0)))
            );
            Ended::Imported(id)
        }
        (Ok(()), None) => Ended::Imported(rec.image_id.unwrap_or_default()),
        (Err(ImportError::Cancelled), _) => Ended::Interrupted(interrupted(&importer, &rec).await),
        (Err(ImportError::Refused(why)), _) => Ended::Refused(why),
        (Err(e), _) => Ended::Failed(e),
    }
}

/// What an interrupted import leaves, in words; a PAR made for a
/// CreateImage never sent is deleted (a second signal exits at once).
async fn interrupted(importer: &Importer, rec: &ImportRecord) -> String {
    match (&rec.image_id, &rec.body, &rec.par_id) {
        (Some(id), _, par) => format!(
            "image {id} goes on importing in OCI; its manifest names it, and `ferry import` run again waits for it{}",
            par.as_deref()
                .map(|p| format!(" (its pre-authenticated request {p} ends at its expiry)"))
                .unwrap_or_default()
        ),
        (None, Some(_), par) => format!(
            "CreateImage was sent and its answer did not arrive: look for an image named {:?} in compartment {} and delete it if it is not wanted{}",
            rec.body
                .as_ref()
                .and_then(|b| b["displayName"].as_str())
                .unwrap_or(""),
            importer.config().compartment_id,
            par.as_deref()
                .map(|p| format!(" (its pre-authenticated request {p} ends at its expiry)"))
                .unwrap_or_default()
        ),
        (None, None, Some(_)) => {
            importer.abandon(rec).await;
            "no image was created; its pre-authenticated request was deleted".into()
        }
        (None, None, None) => "no image was created".into(),
    }
}

/// After `ferry push`: imports each verified object whose destination has an
/// importer, all at once, with progress lines; the ends by destination.
/// Where the manifest says its object is being imported (an image made,
/// not yet ended), `rec` continues that import: its wait is for the same
/// image. Returns the import found.
fn continue_running<'a>(rec: &mut ImportRecord, m: &'a Manifest) -> Option<&'a ImportEntry> {
    let running = m.import.as_ref().filter(|i| i.outcome == "importing")?;
    let id = running.image_id.as_ref()?;
    rec.image_id = Some(id.clone());
    rec.started_at = running.started_at.clone();
    rec.work_request_id = running.work_request_id.clone();
    rec.state = Some(running.state.clone());
    Some(running)
}

/// Imports each verified object where its destination says so, and waits
/// for the images. A manifest that names an import already made (a bucket
/// job taken over from a ferry that stopped) continues it: an image being
/// imported is waited for, not made again, and one AVAILABLE is not
/// imported again.
pub async fn after_push(
    importers: &[(Arc<Destination>, Arc<Importer>)],
    verified: &[(String, Manifest)],
    every: Duration,
    cancel: &Shutdown,
) -> Vec<(String, ImportOutcome)> {
    let runs = importers.iter().filter_map(|(dest, importer)| {
        let (_, m) = verified.iter().find(|(d, _)| d == dest.name())?;
        let m = m.clone();
        Some(async move {
            let watch = Lines {
                who: dest.name().to_string(),
                every: every.max(Duration::from_secs(1)),
                last: Mutex::new(None),
                image: Mutex::new(None),
            };
            if m.import.as_ref().is_some_and(|i| i.outcome == "available") {
                return (
                    dest.name().to_string(),
                    ImportOutcome {
                        manifest: Some(m),
                        result: Ok(()),
                    },
                );
            }
            let mut rec = importer.record(&m, "");
            if let Some(running) = continue_running(&mut rec, &m) {
                info!(
                    destination = dest.name(),
                    "{} is being imported already, as image {}: waiting for it",
                    m.file_name,
                    running.image_id.as_deref().unwrap_or("-")
                );
            }
            let outcome = import_object(dest, importer, m, &mut rec, &watch, cancel).await;
            if let Err(ImportError::Cancelled) = &outcome.result {
                eprintln!(
                    "ferry: {}: import interrupted: {}",
                    dest.name(),
                    interrupted(importer, &rec).await
                );
            }
            (dest.name().to_string(), outcome)
        })
    });
    futures::future::join_all(runs).await
}

/// The object to import: the destination it is in and its manifest.
struct Target {
    /// The destination's name (configured, or made from the URL).
    name: String,
    dest_cfg: DestinationConfig,
    dest: Destination,
    manifest: Manifest,
    /// The manifest file given on the command line.
    file: Option<PathBuf>,
}

impl Target {
    async fn find(config: &Config, args: &ImportArgs) -> Result<Target, String> {
        if args.target.contains("://") {
            Target::from_url(config, args).await
        } else {
            Target::from_file(config, args)
        }
    }

    /// `oci://BUCKET/KEY`: the configured destination whose bucket and
    /// prefix hold KEY (the longest prefix), else one made from the URL.
    async fn from_url(config: &Config, args: &ImportArgs) -> Result<Target, String> {
        let url = &args.target;
        let rest = url.strip_prefix("oci://").ok_or_else(|| {
            format!("{url:?}: give oci://BUCKET/PREFIX/NAME of an object ferry shipped, or the path of its manifest file")
        })?;
        let (bucket, key) = rest
            .split_once('/')
            .filter(|(b, k)| !b.is_empty() && !k.is_empty() && !k.ends_with('/'))
            .ok_or_else(|| format!("{url:?} names no object: give oci://BUCKET/PREFIX/NAME"))?;
        let (name, cfg, object) = choose(config, args, bucket, key)?;
        let dest = Destination::new(&name, &cfg, &config.transfer, 0).map_err(|e| e.to_string())?;
        let mname = format!("{object}{}", manifest::MANIFEST_SUFFIX);
        let bytes = dest.get_small(&mname).await.map_err(|e| {
            format!(
                "cannot read the manifest {} beside the object ({e}): ferry imports objects it shipped and verified; ship the image with ferry first",
                dest.key(&mname)
            )
        })?;
        let m = Manifest::parse(&bytes).map_err(|e| format!("{}: {e}", dest.key(&mname)))?;
        if dest.key(&m.file_name) != key || m.destination.key != key {
            return Err(format!(
                "the manifest beside {key} describes {} (as {}): it is not this object's; ship the image with ferry again",
                m.destination.key, m.file_name
            ));
        }
        Ok(Target {
            name,
            dest_cfg: cfg,
            dest,
            manifest: m,
            file: None,
        })
    }

    /// A manifest file: the destination it names, as configured (by name,
    /// else by URL) or made from its URL.
    fn from_file(config: &Config, args: &ImportArgs) -> Result<Target, String> {
        let path = PathBuf::from(&args.target);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let m = Manifest::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let d = &m.destination;
        let chosen = match &args.destination {
            Some(n) => config
                .destinations
                .get(n)
                .map(|c| (n.clone(), c.clone()))
                .ok_or_else(|| format!("--destination {n}: the config has no such destination"))?,
            None => config
                .destinations
                .get(&d.name)
                .filter(|c| c.url == d.url)
                .map(|c| (d.name.clone(), c.clone()))
                .or_else(|| {
                    config
                        .destinations
                        .iter()
                        .find(|(_, c)| c.url == d.url)
                        .map(|(n, c)| (n.clone(), c.clone()))
                })
                .unwrap_or_else(|| {
                    (
                        d.name.clone(),
                        DestinationConfig {
                            url: d.url.clone(),
                            ..DestinationConfig::default()
                        },
                    )
                }),
        };
        let (name, cfg) = chosen;
        if !matches!(
            DestinationUrl::parse(&cfg.url),
            Ok(DestinationUrl::Oci { .. })
        ) {
            return Err(format!(
                "{}: the object is in {} ({}); OCI imports custom images only from OCI Object Storage (oci://)",
                path.display(),
                name,
                cfg.url
            ));
        }
        let dest = Destination::new(&name, &cfg, &config.transfer, 0).map_err(|e| e.to_string())?;
        if dest.key(&m.file_name) != d.key {
            return Err(format!(
                "{}: the manifest's object is {} but destination {name} ({}) keeps {} at {}: give --destination, or the object's oci:// URL",
                path.display(),
                d.key,
                cfg.url,
                m.file_name,
                dest.key(&m.file_name)
            ));
        }
        Ok(Target {
            name,
            dest_cfg: cfg,
            dest,
            manifest: m,
            file: Some(path),
        })
    }
}

/// The destination holding `bucket`/`key`, and the object's name under its
/// prefix.
fn choose(
    config: &Config,
    args: &ImportArgs,
    bucket: &str,
    key: &str,
) -> Result<(String, DestinationConfig, String), String> {
    let holds = |c: &DestinationConfig| match DestinationUrl::parse(&c.url) {
        Ok(DestinationUrl::Oci { bucket: b, prefix })
            if b == bucket && key.starts_with(&prefix) =>
        {
            Some(prefix.len())
        }
        _ => None,
    };
    if let Some(n) = &args.destination {
        let c = config
            .destinations
            .get(n)
            .ok_or_else(|| format!("--destination {n}: the config has no such destination"))?;
        let at = holds(c).ok_or_else(|| {
            format!(
                "--destination {n} ({}) does not hold oci://{bucket}/{key}",
                c.url
            )
        })?;
        return Ok((n.clone(), c.clone(), key[at..].to_string()));
    }
    let held: Vec<(usize, &String, &DestinationConfig)> = config
        .destinations
        .iter()
        .filter_map(|(n, c)| holds(c).map(|at| (at, n, c)))
        .collect();
    if let Some(longest) = held.iter().map(|(at, ..)| *at).max() {
        let best: Vec<_> = held.iter().filter(|(at, ..)| *at == longest).collect();
        if let [(at, n, c)] = best.as_slice() {
            return Ok(((*n).clone(), (*c).clone(), key[*at..].to_string()));
        }
        // The same bucket and prefix in several regions: which one is meant
        // cannot be guessed.
        return Err(format!(
            "oci://{bucket}/{key} is held by destinations {} alike (the same bucket and prefix, in other regions): give --destination",
            best.iter()
                .map(|(_, n, c)| format!(
                    "{n} ({})",
                    c.region.as_deref().unwrap_or("the profile's region")
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // No configured destination: the bucket and the key's directory, with
    // the profile from the environment, named as `--to URL` names it.
    let (prefix, object) = match key.rfind('/') {
        Some(i) => (&key[..=i], &key[i + 1..]),
        None => ("", key),
    };
    let url = format!("oci://{bucket}/{prefix}");
    let (name, cfg) = crate::store::resolve(&config.destinations, &[url])?
        .pop()
        .ok_or_else(|| format!("oci://{bucket}/{key}: no destination"))?;
    Ok((name, cfg, object.to_string()))
}

/// The import table: the destination's, with what the command line says
/// over it.
fn import_table(
    dest: &DestinationConfig,
    args: &ImportArgs,
    name: &str,
) -> Result<ImportConfig, String> {
    let mut t = match (&dest.import, &args.compartment_id) {
        (Some(t), _) => t.clone(),
        (None, Some(c)) => ImportConfig {
            compartment_id: c.clone(),
            display_name: "{stem}".into(),
            source: ImportSource::Par,
            par_expiry_hours: 24,
            timeout_minutes: 120,
            freeform_tags: BTreeMap::new(),
            endpoint: None,
        },
        (None, None) => {
            return Err(format!(
                "destination {name} has no import table: give --compartment-id OCID, or add [destinations.{name}.import] with compartment_id to the config"
            ));
        }
    };
    if let Some(c) = &args.compartment_id {
        t.compartment_id = c.clone();
    }
    if let Some(d) = &args.display_name {
        t.display_name = d.clone();
    }
    if let Some(s) = args.source {
        t.source = s;
    }
    if let Some(h) = args.par_expiry_hours {
        t.par_expiry_hours = h;
    }
    if let Some(m) = args.timeout_minutes {
        t.timeout_minutes = m;
    }
    if let Some(e) = &args.endpoint {
        t.endpoint = Some(e.clone());
    }
    for (k, v) in &args.tags {
        t.freeform_tags.insert(k.clone(), v.clone());
    }
    // Checked by `Importer::new`, as every table is.
    Ok(t)
}

/// The object must still be the one its manifest describes: its size, and
/// the CRC32C OCI keeps of it (where it keeps one).
async fn check_object(dest: &Destination, m: &Manifest) -> Result<(), String> {
    let key = &m.destination.key;
    let info = dest
        .head(&m.file_name)
        .await
        .map_err(|e| format!("cannot read the object {key} ({e}); nothing was imported"))?;
    if info.size_bytes != m.file_size_bytes {
        return Err(format!(
            "the object {key} has {} bytes, its manifest says {}: it changed since it verified; ship the image again",
            info.size_bytes, m.file_size_bytes
        ));
    }
    if let Some(crc) = info.crc32c
        && manifest::crc_hex(crc) != m.crc32c
    {
        return Err(format!(
            "the object {key} has CRC32C {}, its manifest says {}: it changed since it verified; ship the image again",
            manifest::crc_hex(crc),
            m.crc32c
        ));
    }
    Ok(())
}

/// Writes `path` whole: a temporary file beside it, then a rename.
fn write_file(path: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

/// Progress lines on stderr: a line when the state changes, and at most one
/// every `every` otherwise.
struct Lines {
    who: String,
    every: Duration,
    last: Mutex<Option<(Instant, String)>>,
    image: Mutex<Option<String>>,
}

impl Watch for Lines {
    fn keep(&self, rec: &ImportRecord) -> Result<(), String> {
        if let (Some(id), Ok(mut seen)) = (&rec.image_id, self.image.lock())
            && seen.as_ref() != Some(id)
        {
            *seen = Some(id.clone());
            eprintln!("ferry: {}: image {id} created", self.who);
        }
        Ok(())
    }

    fn shown(&self, v: &ImportView) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let due = match &*last {
            None => true,
            Some((at, state)) => *state != v.state || at.elapsed() >= self.every,
        };
        if !due {
            return;
        }
        *last = Some((Instant::now(), v.state.clone()));
        eprintln!(
            "ferry: {}: {}{}{} ({} elapsed)",
            self.who,
            v.image_id
                .as_deref()
                .map(|i| format!("image {i} "))
                .unwrap_or_default(),
            v.state,
            v.percent.map(|p| format!(", {p:.0}%")).unwrap_or_default(),
            humantime::format_duration(Duration::from_secs(v.elapsed.as_secs()))
        );
    }
}
