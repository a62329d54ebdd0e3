//! The OCI Object Storage double (`tests/support/oci_double.py`) as a test
//! fixture: a new API key, an OCI CLI config file whose profile holds it,
//! namespace `ferryns` with buckets `images` and `spare`, and what a ferry
//! destination table needs to reach it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::*;

const DOUBLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/oci_double.py");

pub const OCI_NAMESPACE: &str = "ferryns";
pub const OCI_TENANCY: &str = "ocid1.tenancy.oc1..aaaaaaaaferrytest";
pub const OCI_USER: &str = "ocid1.user.oc1..aaaaaaaaferrytest";
pub const OCI_FINGERPRINT: &str = "12:34:56:78:9a:bc:de:f0:12:34:56:78:9a:bc:de:f0";
pub const OCI_COMPARTMENT: &str = "ocid1.compartment.oc1..aaaaaaaaferrytest";

pub struct OciDouble {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// The OCI CLI config file; profile `DEFAULT` signs with the registered key.
    pub config_file: PathBuf,
    pub key_file: PathBuf,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A new 2048-bit RSA key at `path` (mode 600) and its public half beside it.
pub fn oci_key(path: &Path) -> PathBuf {
    let p = path.to_str().unwrap();
    openssl(&["genrsa", "-out", p, "2048"]);
    let public = path.with_extension("pub.pem");
    openssl(&["rsa", "-in", p, "-pubout", "-out", public.to_str().unwrap()]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    public
}

impl OciDouble {
    pub fn start() -> OciDouble {
        OciDouble::start_with(|_| {})
    }

    /// Starts the double; `adjust` may change its JSON config first.
    pub fn start_with(adjust: impl FnOnce(&mut serde_json::Value)) -> OciDouble {
        let dir = tmpdir();
        let key_file = dir.path().join("oci_api_key.pem");
        let public = oci_key(&key_file);
        let key_id = format!("{OCI_TENANCY}/{OCI_USER}/{OCI_FINGERPRINT}");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let mut cfg = serde_json::json!({
            "namespace": OCI_NAMESPACE,
            "buckets": ["images", "spare"],
            "keys": { key_id: public },
            "data_dir": data,
        });
        adjust(&mut cfg);
        let cfg_path = write(&dir.path().join("double.json"), &cfg.to_string());
        let config_file = write(
            &dir.path().join("oci-config"),
            &format!(
                "[DEFAULT]\nuser={OCI_USER}\nfingerprint={OCI_FINGERPRINT}\nkey_file={}\ntenancy={OCI_TENANCY}\nregion=us-ashburn-1\n",
                key_file.display()
            ),
        );
        let port = free_port();
        let mut child = Command::new(oci_double_python())
            .arg(DOUBLE)
            .arg(port.to_string())
            .arg(&cfg_path)
            .stdout(Stdio::piped())
            .spawn()
            .expect("the OCI double starts");
        let mut ready = [0u8; 5];
        let said = child.stdout.take().unwrap().read_exact(&mut ready);
        if said.is_err() || &ready != b"ready" {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the OCI double did not say ready");
        }
        OciDouble {
            child,
            port,
            dir,
            config_file,
            key_file,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The keys of an `oci://` destination table reaching the double at
    /// `endpoint` (the double's own, or a relay's in front of it).
    pub fn table_keys(&self, endpoint: &str) -> String {
        format!(
            "region = \"us-ashburn-1\"\nendpoint = \"{endpoint}\"\nconfig_file = \"{}\"\n",
            self.config_file.display()
        )
    }

    /// A whole destination table.
    pub fn table(&self, name: &str, url: &str) -> String {
        format!(
            "[destinations.{name}]\nurl = \"{url}\"\n{}",
            self.table_keys(&self.endpoint())
        )
    }

    /// The images the double's Compute created, and every CreateImage body
    /// it received: `{"created": N, "bodies": [...]}` (its test-only door).
    pub fn images(&self) -> serde_json::Value {
        let (code, body) = http_get(self.port, "/_double/images").expect("the double answers");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// How many images the double's Compute created.
    pub fn images_created(&self) -> u64 {
        self.images()["created"].as_u64().unwrap()
    }

    /// A destination table in region `region` whose objects are imported
    /// (the double answers Compute on its own port), with `import` (lines
    /// of TOML) added to its import table.
    pub fn importing_table(&self, name: &str, url: &str, region: &str, import: &str) -> String {
        format!(
            "[destinations.{name}]\nurl = \"{url}\"\nregion = \"{region}\"\nendpoint = \"{e}\"\nconfig_file = \"{}\"\n[destinations.{name}.import]\ncompartment_id = \"{OCI_COMPARTMENT}\"\nendpoint = \"{e}\"\n{import}\n",
            self.config_file.display(),
            e = self.endpoint(),
        )
    }

    /// A destination config reaching the double.
    pub fn destination_config(&self, url: &str) -> ferry::config::DestinationConfig {
        ferry::config::DestinationConfig {
            url: url.into(),
            region: Some("us-ashburn-1".into()),
            endpoint: Some(self.endpoint()),
            config_file: Some(self.config_file.clone()),
            ..Default::default()
        }
    }
}

impl Drop for OciDouble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
