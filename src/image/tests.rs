use super::*;

#[test]
fn guid_bytes_are_mixed_endian() {
    assert_eq!(
        others_guid_for_test(),
        [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b
        ]
    );
}

fn others_guid_for_test() -> [u8; 16] {
    others::guid_for_test("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
}

/// The CreateImage body, as OCI.md's CreateImage section says: the source
/// by URI, QCOW2 or VMDK as the image type (none for `.oci`), the OS and its
/// version when known, and a launch mode only with a basis (never for
/// `.oci`, whose metadata OCI reads itself).
#[test]
fn create_image_bodies() {
    let url = "https://objectstorage.us-ashburn-1.oraclecloud.com/n/ns/b/images/o/disk.qcow2";
    let mut r = Report::new("disk.qcow2", 1 << 20);
    r.format = "qcow2".into();
    let body = create_image_body(
        &r.import_facts(),
        uri(url),
        "<compartment OCID>",
        "disk.qcow2",
    );
    assert_eq!(body["compartmentId"], "<compartment OCID>");
    assert_eq!(body["displayName"], "disk.qcow2");
    let src = &body["imageSourceDetails"];
    assert_eq!(src["sourceType"], "objectStorageUri");
    assert_eq!(src["sourceUri"], url);
    assert_eq!(src["sourceImageType"], "QCOW2");
    assert!(src.get("operatingSystem").is_none(), "{body}");
    assert!(
        body.get("launchMode").is_none(),
        "no basis, no launch mode: {body}"
    );

    r.launch_mode = "PARAVIRTUALIZED".into();
    r.launch_mode_basis = "attested".into();
    r.os = Some("Oracle Linux".into());
    r.os_version = Some("9".into());
    let body = create_image_body(
        &r.import_facts(),
        uri(url),
        "<compartment OCID>",
        "disk.qcow2",
    );
    assert_eq!(body["launchMode"], "PARAVIRTUALIZED");
    assert_eq!(
        body["imageSourceDetails"]["operatingSystem"],
        "Oracle Linux"
    );
    assert_eq!(body["imageSourceDetails"]["operatingSystemVersion"], "9");

    r.format = "vmdk".into();
    let body = create_image_body(
        &r.import_facts(),
        uri(url),
        "<compartment OCID>",
        "disk.vmdk",
    );
    assert_eq!(body["imageSourceDetails"]["sourceImageType"], "VMDK");

    r.format = "oci".into();
    r.launch_mode_basis = "oci-metadata".into();
    let body = create_image_body(
        &r.import_facts(),
        uri(url),
        "<compartment OCID>",
        "disk.oci",
    );
    assert!(
        body["imageSourceDetails"].get("sourceImageType").is_none(),
        "{body}"
    );
    assert_eq!(body["launchMode"], "PARAVIRTUALIZED", "{body}");
    r.launch_mode = "NATIVE".into();
    let body = create_image_body(
        &r.import_facts(),
        uri(url),
        "<compartment OCID>",
        "disk.oci",
    );
    assert_eq!(body["launchMode"], "NATIVE", "an .oci export's own: {body}");
}

fn uri(url: &str) -> serde_json::Value {
    serde_json::json!({ "sourceType": "objectStorageUri", "sourceUri": url })
}
