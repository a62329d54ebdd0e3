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
