//! The policy loader (`policy::compile_sources`): the input is one or
//! more policy files (separated by NUL bytes), compiled as one set, as a
//! reload compiles a directory. A set that compiles then decides one
//! request on a fresh gate.
//!
//! Checks: nothing panics; loading is deterministic; every error names a
//! file of the set and a position inside it; a compiled set decides.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::engine::{Attributes, Estimate};
use tollgate_core::gate::CheckInput;
use tollgate_core::policy::{compile_sources, content_version, Attr, SourceFile};

fuzz_target!(|data: &[u8]| {
    let files: Vec<SourceFile> = data
        .split(|&b| b == 0)
        .take(8)
        .enumerate()
        .map(|(i, text)| SourceFile {
            name: format!("p{i}.yaml"),
            text: String::from_utf8_lossy(text).into_owned(),
        })
        .collect();
    let got = compile_sources(&files);
    let again = compile_sources(&files);
    match (&got, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a.version, b.version),
        (Err(a), Err(b)) => assert_eq!(a, b, "the same files, other errors"),
        _ => panic!("the same files compiled once and failed once"),
    }
    let policy = match got {
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error with no diagnostic");
            for d in &errors.0 {
                let Some(file) = files.iter().find(|f| f.name == d.file) else {
                    panic!("an error in a file not in the set: {d}");
                };
                assert!(!d.message.is_empty(), "an error with no message: {d}");
                if d.pos.line > 0 {
                    // YAML breaks lines at LF, CRLF and a lone CR alike.
                    let lines = file.text.replace("\r\n", "\n").split(['\n', '\r']).count() as u32;
                    assert!(
                        d.pos.line <= lines + 1,
                        "{d}: past the file's {lines} lines"
                    );
                    assert!(d.pos.col >= 1, "{d}: column 0");
                }
            }
            return;
        }
        Ok(p) => p,
    };
    assert_eq!(&*policy.version, content_version(&files));

    let mut attributes = Attributes::default();
    for (attr, value) in [
        (Attr::Team, "growth"),
        (Attr::Environment, "production"),
        (Attr::Model, "gpt-4o"),
        (Attr::Modality, "text"),
        (Attr::Workflow, "research-agent"),
    ] {
        attributes.set(&attr, value.to_string());
    }
    let input = CheckInput {
        attributes,
        api_key: None,
        estimate: Estimate {
            input_tokens: Some(1200),
            output_tokens: Some(300),
            ..Default::default()
        },
        ..Default::default()
    };
    let gate = tollgate_fuzz::gate(policy);
    let _ = tollgate_fuzz::block_on(gate.check(input));
});
