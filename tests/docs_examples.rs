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
        let result = common::compile(&[(&name, &block.join("\n"))]);
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
