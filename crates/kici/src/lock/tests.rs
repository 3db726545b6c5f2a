use serde_json::json;

use super::*;

/// The reference's example lock file (§2.6), hashes shortened as there.
fn example() -> Value {
    json!({
      "schemaVersion": 29,
      "source": { "file": ".kici/workflows/ci.ts", "export": "#default" },
      "contentHash": "9b1f…e2",
      "lockfileHash": "4c0a…77",
      "workflows": [{
        "name": "ci",
        "source": { "file": ".kici/workflows/ci.ts", "export": "#default" },
        "contentHash": "d41e…0c",
        "compileSchemaVersion": 5,
        "triggers": [
          { "_type": "pr", "events": ["opened","synchronize","reopened","closed"],
            "targetBranches": [], "sourceBranches": [], "paths": [] },
          { "_type": "push", "branches": [{ "type": "glob", "pattern": "main" }], "paths": ["src/**", "!**/*.md"] }
        ],
        "jobs": [
          { "_type": "static", "name": "test",
            "runsOn": [{ "kind": "exact", "value": "kici:os:linux" }], "runsOnPick": "deterministic",
            "needs": [],
            "steps": [
              { "name": "install", "hasOutputs": false, "sourceLocation": { "file": ".kici/workflows/ci.ts", "line": 5, "column": 17 } },
              { "name": "test", "hasOutputs": false, "timeout": 600000,
                "retry": { "maxAttempts": 3, "delayMs": 1000, "backoff": "exponential", "maxDelayMs": 30000 } }
            ],
            "matrix": { "_type": "dynamic", "source": { "file": ".kici/workflows/ci.ts", "jobName": "test" } } },
          { "_type": "static", "name": "deploy",
            "runsOn": [{ "kind": "exact", "value": "kici:os:linux" }], "runsOnPick": "deterministic",
            "needs": ["test"],
            "steps": [{ "name": "deploy", "hasOutputs": false }],
            "rules": [{ "_type": "dynamic", "label": "only on main", "source": { "file": ".kici/workflows/ci.ts", "index": 100 } }],
            "environments": [{ "value": "production", "dynamic": false }],
            "concurrencyGroup": "production", "hasCleanup": true, "timeout": 1800000 }
        ]
      }]
    })
}

fn parse(v: &Value) -> Result<LockFile, LockError> {
    parse_lock_file(v.to_string().as_bytes())
}

fn job_mut(v: &mut Value, i: usize) -> &mut Value {
    &mut v["workflows"][0]["jobs"][i]
}

#[test]
fn the_reference_example_parses_and_keeps_what_it_does_not_model() {
    let lock = parse(&example()).unwrap();
    let wf = &lock.workflows[0];
    assert_eq!(
        (wf.name.as_str(), wf.triggers.len(), wf.jobs.len()),
        ("ci", 2, 2)
    );
    let LockJobEntry::Static(deploy) = &wf.jobs[1] else {
        panic!("static")
    };
    assert_eq!(deploy.needs, vec![Need::Name("test".into())]);
    assert_eq!(deploy.timeout, Some(1_800_000));
    assert_eq!(deploy.extra["concurrencyGroup"], "production");
    assert_eq!(lock.extra["lockfileHash"], "4c0a…77");
    // What is kept comes back out: a round trip is lossless.
    let again: Value = serde_json::to_value(&lock).unwrap();
    assert_eq!(again, example());
}

#[test]
fn other_schema_versions_and_malformed_files_are_refused() {
    let mut old = example();
    old["schemaVersion"] = 28.into();
    assert_eq!(
        parse(&old).unwrap_err(),
        LockError::SchemaVersion { found: 28 }
    );
    assert!(matches!(
        parse_lock_file(b"{not json"),
        Err(LockError::Malformed(_))
    ));
    assert!(matches!(
        parse(&json!({"workflows": []})),
        Err(LockError::Malformed(_))
    ));
    // A plain string where a label matcher belongs is a hard error.
    let mut plain = example();
    job_mut(&mut plain, 0)["runsOn"] = json!(["kici:os:linux"]);
    assert!(matches!(parse(&plain), Err(LockError::Malformed(_))));
}

#[test]
fn label_matchers_compile_and_match() {
    let mut v = example();
    job_mut(&mut v, 0)["runsOn"] =
        json!([{"kind": "regex", "source": "^kici:os:(linux|darwin)$", "flags": "i"}]);
    let lock = parse(&v).unwrap();
    let LockJobEntry::Static(job) = &lock.workflows[0].jobs[0] else {
        panic!()
    };
    let m = &job.runs_on.as_ref().unwrap()[0];
    assert!(m.matches("KICI:OS:LINUX") && !m.matches("kici:os:windows"));
    assert!(LabelMatcher::Exact { value: "a".into() }.matches("a"));
    // A pattern the regex engine cannot take (backreferences) or an unknown flag: refused.
    for bad in [
        json!({"kind": "regex", "source": "(a)\\1", "flags": ""}),
        json!({"kind": "regex", "source": "a+", "flags": "x"}),
    ] {
        let mut v = example();
        job_mut(&mut v, 1)["excludeLabels"] = json!([bad]);
        assert!(matches!(parse(&v), Err(LockError::Label { .. })), "{bad}");
    }
    // A pattern that backtracks exponentially elsewhere matches in linear time here.
    let evil = LabelMatcher::Regex {
        source: "^(a+)+$".into(),
        flags: String::new(),
    };
    assert!(!evil.matches(&format!("{}b", "a".repeat(10_000))));
}

#[test]
fn the_needs_graph_is_checked() {
    let mut missing = example();
    job_mut(&mut missing, 1)["needs"] = json!(["lint"]);
    assert_eq!(
        parse(&missing).unwrap_err(),
        LockError::MissingDependency {
            workflow: "ci".into(),
            job: "deploy".into(),
            missing: "lint".into()
        }
    );
    let mut own = example();
    job_mut(&mut own, 1)["needs"] = json!([{"name": "deploy", "runOn": ["success"]}]);
    assert_eq!(
        parse(&own).unwrap_err(),
        LockError::SelfReference {
            workflow: "ci".into(),
            job: "deploy".into()
        }
    );
    let mut cycle = example();
    job_mut(&mut cycle, 0)["needs"] = json!(["deploy"]);
    let mut third = job_mut(&mut cycle, 1).clone();
    third["name"] = "notify".into();
    third["needs"] = json!(["deploy"]);
    cycle["workflows"][0]["jobs"]
        .as_array_mut()
        .unwrap()
        .push(third);
    assert_eq!(
        parse(&cycle).unwrap_err(),
        LockError::Cycle {
            workflow: "ci".into(),
            jobs: vec!["deploy".into(), "notify".into(), "test".into()]
        }
    );
    let mut twice = example();
    job_mut(&mut twice, 1)["name"] = "test".into();
    assert_eq!(
        parse(&twice).unwrap_err(),
        LockError::DuplicateJob {
            workflow: "ci".into(),
            job: "test".into()
        }
    );
    let mut twins = example();
    let copy = twins["workflows"][0].clone();
    twins["workflows"].as_array_mut().unwrap().push(copy);
    assert_eq!(
        parse(&twins).unwrap_err(),
        LockError::DuplicateWorkflow("ci".into())
    );
    // Group needs name no job.
    let mut group = example();
    job_mut(&mut group, 1)["needs"] = json!([{"group": "shards", "runOn": ["success"]}, "test"]);
    assert!(parse(&group).is_ok());
}

#[test]
fn static_matrices_expand_within_the_limit() {
    let mut v = example();
    let job = job_mut(&mut v, 0);
    job["matrix"] =
        json!({"_type": "static", "values": {"os": ["linux", "mac"], "node": ["20", "22"]}});
    job["exclude"] = json!([{"os": "mac", "node": "20"}]);
    job["include"] = json!([{"os": "windows", "node": "22"}, {"os": "linux", "node": "20"}]);
    let lock = parse(&v).unwrap();
    let LockJobEntry::Static(job) = &lock.workflows[0].jobs[0] else {
        panic!()
    };
    let expanded = expand_matrix(job).unwrap();
    let combos: Vec<Vec<&str>> = expanded
        .iter()
        .map(|c| vec![c["os"].as_str(), c["node"].as_str()])
        .collect();
    assert_eq!(
        combos,
        [
            ["linux", "20"],
            ["linux", "22"],
            ["mac", "22"],
            ["windows", "22"]
        ]
    );
    let mut list = example();
    job_mut(&mut list, 0)["matrix"] = json!({"_type": "static", "values": ["a", "b", "c"]});
    let lock = parse(&list).unwrap();
    let LockJobEntry::Static(job) = &lock.workflows[0].jobs[0] else {
        panic!()
    };
    assert_eq!(expand_matrix(job).unwrap().len(), 3);
    // 16 × 17 = 272 > 256.
    let axis = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>();
    let mut big = example();
    job_mut(&mut big, 0)["matrix"] =
        json!({"_type": "static", "values": {"a": axis(16), "b": axis(17)}});
    assert!(matches!(parse(&big), Err(LockError::Job { .. })));
    let mut exactly = example();
    job_mut(&mut exactly, 0)["matrix"] =
        json!({"_type": "static", "values": {"a": axis(16), "b": axis(16)}});
    assert!(parse(&exactly).is_ok());
    let mut empty = example();
    job_mut(&mut empty, 0)["matrix"] = json!({"_type": "static", "values": {"a": []}});
    assert!(matches!(parse(&empty), Err(LockError::Job { .. })));
}

#[test]
fn job_shapes_are_checked() {
    let mut both = example();
    job_mut(&mut both, 0)["runsOnAll"] = json!({"include": [[{"kind": "exact", "value": "x"}]]});
    assert!(matches!(parse(&both), Err(LockError::Job { .. })));
    let mut pick = example();
    job_mut(&mut pick, 0)["runsOnPick"] = "random".into();
    assert!(matches!(parse(&pick), Err(LockError::Job { .. })));
    let mut steps = example();
    job_mut(&mut steps, 0)["steps"] = json!([
        {"name": "a", "hasOutputs": false, "run": "make"},
        {"kind": "parallel", "name": "checks", "failFast": true, "children": [
            {"name": "lint", "hasOutputs": false, "run": "make lint"},
            {"name": "a", "hasOutputs": false}]}
    ]);
    assert!(
        matches!(parse(&steps), Err(LockError::Job { .. })),
        "step names are unique across groups"
    );
    let mut ok = example();
    job_mut(&mut ok, 0)["steps"] = json!([
        {"name": "a", "hasOutputs": false, "run": "make"},
        {"kind": "parallel", "name": "checks", "children": [{"name": "lint", "hasOutputs": false, "run": "make lint"}]}
    ]);
    let lock = parse(&ok).unwrap();
    let LockJobEntry::Static(job) = &lock.workflows[0].jobs[0] else {
        panic!()
    };
    let LockStepEntry::Parallel(group) = &job.steps[1] else {
        panic!("a parallel group")
    };
    assert!(group.fail_fast, "failFast defaults to true");
    assert_eq!(group.children[0].run.as_deref(), Some("make lint"));
    let mut empty = example();
    job_mut(&mut empty, 0)["steps"] = json!([{"kind": "parallel", "name": "none", "children": []}]);
    assert!(matches!(parse(&empty), Err(LockError::Job { .. })));
}
