//! Arbitrary bytes into the front door's reader: the CONNECT sniffer and
//! both protocols' packet decoders, then every view and rewrite the session
//! applies, and re-encoding. None may panic, whatever a client sends.
#![no_main]

use bytes::BytesMut;
use edgeferry::frontdoor::wire::{self, Version, View};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::sniff(data);
    for version in [Version::V4, Version::V5] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(mut p)) = version.read(&mut buf, 64 * 1024) {
            if let View::Publish(v) = p.view() {
                let _ = wire::valid_topic(v.topic);
            }
            let _ = p.connect_info();
            p.strip_properties();
            p.set_pkid(7);
            p.limit_connack(100);
            p.retain_filters(&[true, false]);
            p.refuse_in_suback(&[false, true, true]);
            let _ = p.write(&mut BytesMut::new());
        }
    }
});
