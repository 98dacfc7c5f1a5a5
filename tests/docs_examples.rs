//! Every policy example in docs/policies.md loads (or, when marked
//! `yaml invalid`, fails), so the documentation cannot drift from the code.

mod common;

#[test]
fn every_policy_example_in_the_docs_behaves_as_documented() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/policies.md");
    let text = std::fs::read_to_string(&path).expect("docs/policies.md exists");
    let mut valid = 0;
    let mut invalid = 0;
    let mut lines = text.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let fence = line.trim_start();
        let expect_ok = match fence {
            "```yaml" => true,
            "```yaml invalid" => false,
            _ => continue,
        };
        let block: Vec<&str> = lines
            .by_ref()
            .map(|(_, l)| l)
            .take_while(|l| l.trim_start() != "```")
            .collect();
        let name = format!("docs/policies.md:{}", n + 1);
        let text = block.join("\n");
        let result = if text.contains("import:") {
            // Catalogs are named relative to the policy file: these
            // examples stand beside the shipped policies.
            let mut files = common::sources(&[(&format!("policies/docs-{}.yaml", n + 1), &text)]);
            tollgate_core::policy::add_catalogs(&mut files);
            tollgate_core::policy::compile_sources(&files)
        } else {
            common::compile(&[(&name, &text)])
        };
        match (expect_ok, result) {
            (true, Ok(_)) => valid += 1,
            (false, Err(_)) => invalid += 1,
            (true, Err(e)) => panic!("example at {name} should load:\n{e}"),
            (false, Ok(_)) => panic!("example at {name} is marked invalid but loads"),
        }
    }
    assert!(
        valid >= 10,
        "expected an example per feature, found {valid}"
    );
    assert!(invalid >= 1, "expected at least one example of a mistake");
}
