//! The deployment files agree with the code: the Dockerfile builds the
//! binary Cargo.toml declares and runs it unprivileged with a health check;
//! the Kubernetes manifests mount policies so live reload works, probe the
//! right endpoints and hold configuration tollgate accepts; the systemd
//! unit's configuration file loads. No Docker or Kubernetes runs here.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One Dockerfile instruction, continuation lines joined.
#[derive(Debug)]
struct Instruction {
    op: String,
    args: String,
}

fn dockerfile(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (op, args) = current.split_once(' ').unwrap_or((&current, ""));
        out.push(Instruction {
            op: op.to_ascii_uppercase(),
            args: args.trim().to_string(),
        });
        current.clear();
    }
    out
}

/// `[[bin]] name`, and `rust-version`, from Cargo.toml.
fn cargo_toml() -> (String, String) {
    let toml = read("Cargo.toml");
    let mut bin = None;
    let mut rust_version = None;
    let mut in_bin = false;
    for line in toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        }
        let value = |l: &str| {
            l.split_once('=')
                .unwrap()
                .1
                .trim()
                .trim_matches('"')
                .to_string()
        };
        if in_bin && line.starts_with("name") {
            bin = Some(value(line));
        }
        if line.starts_with("rust-version") {
            rust_version = Some(value(line));
        }
    }
    (bin.unwrap(), rust_version.unwrap())
}

fn version_tuple(v: &str) -> (u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap_or(0))
}

#[test]
fn the_dockerfile_builds_the_declared_binary_and_runs_it_unprivileged() {
    let (bin, rust_version) = cargo_toml();
    let all = dockerfile(&read("deploy/docker/Dockerfile"));
    let stages: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, i)| i.op == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert!(stages.len() >= 2, "not multi-stage");
    let builder = &all[stages[0]..stages[stages.len() - 1]];
    let runtime = &all[stages[stages.len() - 1]..];

    // The builder: a Rust image new enough for `rust-version`, building
    // exactly the declared binary, locked and in release mode.
    let from = &builder[0].args;
    let alias = from.split_whitespace().last().unwrap();
    assert!(from.contains(" AS ") || from.contains(" as "), "{from}");
    let tag = from
        .split_whitespace()
        .next()
        .unwrap()
        .strip_prefix("rust:")
        .expect("the builder is an official rust image");
    let tag_version = tag.split('-').next().unwrap();
    assert!(
        version_tuple(tag_version) >= version_tuple(&rust_version),
        "builder {tag} is older than rust-version {rust_version}"
    );
    let build = builder
        .iter()
        .find(|i| i.op == "RUN" && i.args.contains("cargo build"))
        .expect("a cargo build step");
    for flag in ["--locked", "--release", &format!("--bin {bin}")] {
        assert!(build.args.contains(flag), "{flag} missing: {}", build.args);
    }
    // Everything copied from the context exists in the repository.
    for copy in all
        .iter()
        .filter(|i| i.op == "COPY" && !i.args.starts_with("--from"))
    {
        let parts: Vec<&str> = copy.args.split_whitespace().collect();
        for source in &parts[..parts.len() - 1] {
            assert!(
                repo(source).exists(),
                "COPY {source}: not in the repository"
            );
        }
    }

    // The runtime: the built binary, not root, with a health check that
    // runs that binary, the ports of the default configuration exposed.
    let copied = runtime
        .iter()
        .find(|i| i.op == "COPY" && i.args.starts_with(&format!("--from={alias}")))
        .expect("the binary is copied from the builder");
    assert!(
        copied.args.contains(&format!("/target/release/{bin} ")),
        "{}",
        copied.args
    );
    let installed = copied.args.split_whitespace().last().unwrap();
    let user = runtime
        .iter()
        .rev()
        .find(|i| i.op == "USER")
        .expect("the runtime stage sets USER");
    let uid = user.args.split(':').next().unwrap();
    assert!(
        uid != "root" && uid != "0",
        "the runtime runs as {}",
        user.args
    );
    let health = runtime
        .iter()
        .find(|i| i.op == "HEALTHCHECK")
        .expect("a HEALTHCHECK");
    assert!(
        health
            .args
            .contains(&format!("\"{installed}\", \"health\"")),
        "{}",
        health.args
    );
    let exposed: Vec<&str> = runtime
        .iter()
        .filter(|i| i.op == "EXPOSE")
        .flat_map(|i| i.args.split_whitespace())
        .collect();
    let config = print_config(&repo("deploy/docker/tollgate.yaml"));
    for key in ["listen", "http-listen"] {
        let port = value(&config, key).rsplit(':').next().unwrap().to_string();
        assert!(
            exposed.contains(&port.as_str()),
            "{key} port {port} not exposed"
        );
    }
    assert!(read(".dockerignore").lines().any(|l| l.trim() == "target"));
}

/// `serve --print-config` with `file` as the configuration.
fn print_config(file: &Path) -> String {
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(file)
        .arg("--print-config")
        .env_remove("TOLLGATE_LISTEN")
        .env_remove("TOLLGATE_HTTP_LISTEN")
        .env_remove("TOLLGATE_POLICIES")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A value from `--print-config` output, unquoted.
fn value(config: &str, key: &str) -> String {
    let line = config
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .unwrap();
    let v = line[key.len() + 1..].split('#').next().unwrap().trim();
    v.trim_matches(|c| c == '"' || c == '[' || c == ']')
        .to_string()
}

/// Every document of every manifest in `deploy/kubernetes`, by kind.
fn manifests() -> Vec<(String, Yaml)> {
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(repo("deploy/kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}")) {
            docs.push((name.clone(), doc));
        }
    }
    docs
}

fn of_kind<'a>(docs: &'a [(String, Yaml)], kind: &str, name: &str) -> &'a Yaml {
    &docs
        .iter()
        .find(|(_, d)| {
            d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name)
        })
        .unwrap_or_else(|| panic!("no {kind} {name}"))
        .1
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

#[test]
fn the_kubernetes_manifests_fit_tollgate() {
    let docs = manifests();
    let files: Vec<&str> = docs.iter().map(|(f, _)| f.as_str()).collect();
    let kustomization = docs
        .iter()
        .find(|(_, d)| d["kind"].as_str() == Some("Kustomization"))
        .expect("a kustomization")
        .1
        .clone();
    for f in &files {
        if *f != "kustomization.yaml" {
            assert!(
                list(&kustomization["resources"])
                    .iter()
                    .any(|r| r.as_str() == Some(f)),
                "{f} is not in kustomization.yaml"
            );
        }
    }

    let deployment = of_kind(&docs, "Deployment", "ai-gateway");
    let pod = &deployment["spec"]["template"]["spec"];
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let containers = list(&pod["containers"]);
    let find = |name: &str| {
        containers
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no {name} container"))
    };
    let tollgate = find("tollgate");
    find("envoy");

    for c in containers {
        assert!(
            !c["resources"]["requests"]["cpu"].is_badvalue()
                && !c["resources"]["requests"]["memory"].is_badvalue(),
            "{:?} has no resource requests",
            c["name"]
        );
        for m in list(&c["volumeMounts"]) {
            assert!(
                m["subPath"].is_badvalue(),
                "{:?}: subPath mounts never see ConfigMap updates",
                m["mountPath"]
            );
        }
    }

    // The configuration the pod runs with is one tollgate accepts.
    let env = list(&tollgate["env"]);
    let env_var = |name: &str| {
        env.iter()
            .find(|e| e["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let config_path = env_var("TOLLGATE_CONFIG")["value"].as_str().unwrap();
    let mounts = list(&tollgate["volumeMounts"]);
    let volume_of = |mount_path: &str| -> String {
        let m = mounts
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(mount_path))
            .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
        let volume = list(&pod["volumes"])
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap();
        volume["configMap"]["name"].as_str().unwrap().to_string()
    };
    let (config_dir, config_file) = config_path.rsplit_once('/').unwrap();
    let config_map = of_kind(&docs, "ConfigMap", &volume_of(config_dir));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(config_file),
        config_map["data"][config_file].as_str().unwrap(),
    )
    .unwrap();
    let config = print_config(&dir.path().join(config_file));

    // Policies: mounted where the configuration looks, and valid.
    let policies_dir = value(&config, "policies");
    let policies = of_kind(&docs, "ConfigMap", &volume_of(&policies_dir));
    let policy_files = tempfile::tempdir().unwrap();
    for (name, text) in policies["data"].as_hash().unwrap() {
        std::fs::write(
            policy_files.path().join(name.as_str().unwrap()),
            text.as_str().unwrap(),
        )
        .unwrap();
    }
    let validate = Command::new(BIN)
        .arg("validate")
        .arg(policy_files.path())
        .output()
        .unwrap();
    assert!(
        validate.status.success(),
        "{}",
        String::from_utf8_lossy(&validate.stderr)
    );

    // Probes reach the HTTP listener on the pod IP.
    let http_listen = value(&config, "http-listen");
    assert!(http_listen.starts_with("0.0.0.0:"), "{http_listen}");
    let http_port: i64 = http_listen.rsplit(':').next().unwrap().parse().unwrap();
    let port_named = |name: &str| {
        list(&tollgate["ports"])
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64())
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &tollgate[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        let port = get["port"]
            .as_i64()
            .or_else(|| get["port"].as_str().and_then(port_named));
        assert_eq!(port, Some(http_port), "{probe} port");
    }
    // Envoy reaches ext_proc on the gRPC listener, on loopback.
    let envoy_config = of_kind(&docs, "ConfigMap", "envoy-config");
    assert_eq!(
        envoy_config["data"]["envoy.yaml"].as_str().unwrap(),
        read("deploy/envoy/envoy.yaml"),
        "the ConfigMap must hold deploy/envoy/envoy.yaml as it is"
    );
    assert_eq!(value(&config, "listen"), "127.0.0.1:50051");

    // The Redis URL comes from a Secret that has that key.
    let secret_ref = &env_var("TOLLGATE_REDIS_URL")["valueFrom"]["secretKeyRef"];
    let secret = of_kind(&docs, "Secret", secret_ref["name"].as_str().unwrap());
    let key = secret_ref["key"].as_str().unwrap();
    assert!(
        !secret["stringData"][key].is_badvalue() || !secret["data"][key].is_badvalue(),
        "the Secret has no {key}"
    );

    // The disruption budget covers these pods.
    let pdb = docs
        .iter()
        .find(|(_, d)| d["kind"].as_str() == Some("PodDisruptionBudget"))
        .expect("a PodDisruptionBudget")
        .1
        .clone();
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_hash().unwrap() {
        assert_eq!(&pod_labels[k.as_str().unwrap()], v);
    }
    // The preStop sleep, the drain and the flush (bounded by the drain
    // timeout too) must fit in the grace period, or SIGKILL cuts them short.
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    let drain = value(&config, "drain-timeout");
    let drain: i64 = drain.trim_end_matches('s').parse().unwrap();
    let pre_stop = tollgate["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .unwrap_or(0);
    assert!(
        grace >= pre_stop + 2 * drain,
        "grace {grace}s, preStop {pre_stop}s, drain {drain}s"
    );
}

#[test]
fn the_systemd_unit_starts_from_a_configuration_that_loads() {
    let unit = read("deploy/systemd/tollgate.service");
    let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
    let path = exec
        .split_whitespace()
        .skip_while(|w| *w != "--config")
        .nth(1)
        .expect("ExecStart names --config");
    assert_eq!(path, "/etc/tollgate/tollgate.yaml");
    let config = print_config(&repo("deploy/systemd/tollgate.yaml"));
    assert_eq!(value(&config, "policies"), "/etc/tollgate/policies");
    assert!(unit.contains("ExecStartPre=/usr/local/bin/tollgate validate /etc/tollgate/policies"));
    // systemd's stop timeout must outlast the drain and the flush.
    let stop: i64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .unwrap();
    let drain: i64 = value(&config, "drain-timeout")
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(stop >= 2 * drain);
}

#[test]
fn the_health_subcommand_answers_for_a_container_health_check() {
    let dir = common::policy_dir(&[(
        "p.yaml",
        "rules:\n  - id: r\n    limit: { requests: 1, window: daily }\n",
    )]);
    let server = common::TollgateProcess::start(&["--policies", dir.path().to_str().unwrap()]);
    let health = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(BIN)
            .arg("health")
            .args(args)
            .env_remove("TOLLGATE_HTTP_LISTEN")
            .env_remove("TOLLGATE_CONFIG")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let addr = format!("0.0.0.0:{}", server.http_port);
    let ok = health(&["--http-listen", &addr], &[]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("\"ready\":true"));

    // As in the image: the address comes from the serve configuration file.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), format!("http-listen: {addr}\n")).unwrap();
    // A container runtime retries a failed check (the Dockerfile's
    // HEALTHCHECK has --retries), so a check that loses one round to a
    // loaded machine is retried here too; what each failure said is shown.
    let mut failures = Vec::new();
    let passed = (0..3).any(|_| {
        let out = health(&[], &[("TOLLGATE_CONFIG", config.path().to_str().unwrap())]);
        if !out.status.success() {
            failures.push(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        out.status.success()
    });
    assert!(passed, "{failures:?}");

    let dead = format!("127.0.0.1:{}", common::free_port());
    assert_eq!(
        health(&["--http-listen", &dead], &[]).status.code(),
        Some(1)
    );
}
