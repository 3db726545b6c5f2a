use serde_json::json;

use super::*;
use crate::lock::{LockJobEntry, LockStepEntry, expand_matrix};
use crate::trigger::{Event, decide};

fn src(text: &str) -> WorkflowSource {
    WorkflowSource {
        file: ".kici/workflows/ci.yml".into(),
        text: text.into(),
    }
}

const CI: &str = r#"
name: ci
on:
  - push: { branches: [main], tags: ["v*"], paths: ["src/**", "!**/*.md"] }
  - pr: { target: [main] }
timeout: 3600000
jobs:
  build:
    runsOn: kici:os:linux
    run: make build
  test:
    runsOn: { labels: [kici:os:linux, "gpu-*"], exclude: [flaky] }
    needs: [build, { name: lint, when: always }]
    matrix: { node: [18, 20, 22] }
    env: { CI: "true" }
    timeout: 600000
    concurrencyGroup: tests
    steps:
      - run: npm ci
      - name: unit
        run: npm test
        retry: 3
        continueOnError: true
      - parallel:
          steps: [{ run: "echo a" }, { name: b, run: "echo b" }]
  lint:
    runsOn: [kici:os:linux]
    run: make lint
"#;

#[test]
fn a_workflow_compiles_to_a_lock_file_the_orchestrator_accepts() {
    let lock = compile(&[src(CI)]).unwrap();
    assert_eq!(lock.schema_version, 29);
    let text = to_lock_json(&lock);
    assert!(text.ends_with("}\n") && text.contains("\n  \"schemaVersion\": 29"));
    assert_eq!(crate::parse_lock_file(text.as_bytes()).unwrap(), lock);
    let wf = &lock.workflows[0];
    assert_eq!(wf.name, "ci");
    assert_eq!(wf.timeout, Some(3_600_000));
    // push with tags also emits a tag trigger; pr gets the default events.
    let kinds: Vec<&str> = wf
        .triggers
        .iter()
        .map(|t| t["_type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["push", "tag", "pr"]);
    assert_eq!(
        wf.triggers[0]["branches"],
        json!([{"type": "glob", "pattern": "main"}])
    );
    assert_eq!(
        wf.triggers[1]["patterns"],
        json!([{"type": "glob", "pattern": "v*"}])
    );
    assert_eq!(
        wf.triggers[2]["events"],
        json!(["opened", "synchronize", "reopened", "closed"])
    );
    let names: Vec<String> = wf
        .jobs
        .iter()
        .map(|j| match j {
            LockJobEntry::Static(j) => j.name.clone(),
            LockJobEntry::Dynamic(_) => unreachable!(),
        })
        .collect();
    assert_eq!(
        names,
        ["build", "test", "lint"],
        "jobs keep their written order"
    );
    let LockJobEntry::Static(test) = &wf.jobs[1] else {
        unreachable!()
    };
    let runs_on = serde_json::to_value(&test.runs_on).unwrap();
    assert_eq!(
        runs_on,
        json!([{"kind": "exact", "value": "kici:os:linux"},
               {"kind": "regex", "source": "^gpu\\-.*$", "flags": ""}])
    );
    assert_eq!(
        serde_json::to_value(&test.exclude_labels).unwrap(),
        json!([{"kind": "exact", "value": "flaky"}])
    );
    assert_eq!(
        serde_json::to_value(&test.needs).unwrap(),
        json!(["build", {"name": "lint", "runOn":
            ["success", "failed", "cancelled", "skipped", "timed_out_stale", "drift_dropped"]}])
    );
    assert_eq!(expand_matrix(test).unwrap().len(), 3);
    assert_eq!(test.extra["env"], json!({"CI": "true"}));
    assert_eq!(test.extra["concurrencyGroup"], "tests");
    assert_eq!(test.timeout, Some(600_000));
    // One counter names unnamed steps across the job, parallel children included.
    let LockStepEntry::Step(first) = &test.steps[0] else {
        unreachable!()
    };
    assert_eq!(
        (first.name.as_str(), first.run.as_deref()),
        ("step-1", Some("npm ci"))
    );
    let LockStepEntry::Step(unit) = &test.steps[1] else {
        unreachable!()
    };
    assert!(unit.continue_on_error);
    assert_eq!(unit.extra["retry"]["maxAttempts"], 3);
    let LockStepEntry::Parallel(group) = &test.steps[2] else {
        unreachable!()
    };
    assert_eq!(group.name, "parallel-1");
    assert!(group.fail_fast);
    let children: Vec<&str> = group.children.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(children, ["step-3", "b"]);
}

#[test]
fn compiled_triggers_match_as_the_reference_does() {
    let lock = compile(&[src(CI)]).unwrap();
    let wf = &lock.workflows[0];
    let push = |branch: &str, files: &[&str]| Event {
        kind: "push".into(),
        action: String::new(),
        target_branch: Some(branch.into()),
        changed_files: Some(files.iter().map(|f| f.to_string()).collect()),
        ..Event::default()
    };
    assert!(
        decide(&wf.triggers, &push("main", &["src/lib.rs"]))
            .matched
            .is_some()
    );
    assert!(
        decide(&wf.triggers, &push("main", &["README.md"]))
            .matched
            .is_none()
    );
    assert!(
        decide(&wf.triggers, &push("dev", &["src/lib.rs"]))
            .matched
            .is_none()
    );
}

#[test]
fn the_content_hash_ignores_line_endings_and_follows_the_text() {
    let a = compile(&[src(CI)]).unwrap();
    let b = compile(&[src(&CI.replace('\n', "\r\n"))]).unwrap();
    assert_eq!(a.content_hash, b.content_hash);
    let c = compile(&[src(&CI.replace("make lint", "make lint2"))]).unwrap();
    assert_ne!(a.content_hash, c.content_hash);
    assert_eq!(a.content_hash.len(), 64);
}

fn error(text: &str) -> String {
    compile(&[src(text)]).unwrap_err().to_string()
}

#[test]
fn bad_workflows_say_what_is_wrong() {
    let base = "name: w\njobs:\n  a:\n    runsOn: x\n";
    assert!(error(&format!("{base}    run: t\n    colour: red\n")).contains("colour"));
    assert!(error("name: w\njobs:\n  a:\n    run: t\n").contains("`runsOn` is required"));
    assert!(error(&format!("{base}    run: t\n    steps: [{{run: u}}]\n")).contains("both"));
    assert!(error(&format!("{base}    needs: [b]\n    run: t\n")).contains("E101"));
    assert!(error(&format!("{base}    needs: [a]\n    run: t\n")).contains("E103"));
    let cycle = "name: w\njobs:\n  a: {runsOn: x, needs: [b], run: t}\n  b: {runsOn: x, needs: [a], run: t}\n";
    assert!(error(cycle).contains("E102"));
    let unknown = format!(
        "name: w\non: [{{pullrequest: {{}}}}]\n{}    run: t\n",
        &base[8..]
    );
    assert!(
        error(&unknown).contains("unknown trigger `pullrequest`"),
        "{}",
        error(&unknown)
    );
    let option = format!(
        "name: w\non: [{{push: {{branch: [main]}}}}]\n{}    run: t\n",
        &base[8..]
    );
    assert!(error(&option).contains("no option `branch`"));
    let when = format!(
        "{base}    run: t\n  b: {{runsOn: x, run: t, needs: [{{name: a, when: later}}]}}\n"
    );
    assert!(error(&when).contains("when: later"));
    assert!(error("name: [").contains("ci.yml"));
    let big = "name: w\njobs:\n  a:\n    runsOn: x\n    run: t\n    matrix: {a: [1,2,3,4,5,6,7], b: [1,2,3,4,5,6,7], c: [1,2,3,4,5,6]}\n";
    assert!(error(big).contains("at most 256"));
    let dup = compile(&[
        src(&format!("{base}    run: t\n")),
        src(&format!("{base}    run: u\n")),
    ])
    .unwrap_err();
    assert!(dup.to_string().contains("E107"), "{dup}");
}

#[test]
fn schedule_and_generic_webhook_triggers_compile() {
    let text = "name: nightly\non:\n  - schedule: { cron: \"0 3 * * *\" }\n  - genericWebhook: { source: deploys, events: [done] }\njobs:\n  a: {runsOn: x, run: t}\n";
    let lock = compile(&[src(text)]).unwrap();
    assert_eq!(
        lock.workflows[0].triggers,
        vec![
            json!({"_type": "schedule", "cronExpression": "0 3 * * *", "timezone": "UTC"}),
            json!({"_type": "generic_webhook", "source": "deploys", "events": ["done"]}),
        ]
    );
    assert!(
        error("name: n\non: {schedule: {cron: \"* *\"}}\njobs:\n  a: {runsOn: x, run: t}\n")
            .contains("5")
    );
}

#[test]
fn concurrency_groups_compile_and_render() {
    let text = "name: d\nconcurrency: { group: \"deploy-${branch}\", cancelInProgress: false }\njobs:\n  a: {runsOn: x, run: t}\n";
    let lock = compile(&[src(text)]).unwrap();
    assert_eq!(
        lock.workflows[0].extra["concurrency"],
        json!({"hasGroup": true, "group": "deploy-${branch}", "cancelInProgress": false, "max": 1})
    );
    assert_eq!(
        render_group("deploy-${branch}@${sha}", |p| format!("<{p}>")).unwrap(),
        "deploy-<branch>@<sha>"
    );
    assert!(
        error("name: d\nconcurrency: { group: \"x-${user}\" }\njobs:\n  a: {runsOn: x, run: t}\n")
            .contains("unknown placeholder `${user}`")
    );
    assert!(
        render_group("x-${ref", |_| String::new())
            .unwrap_err()
            .contains("not closed")
    );
}
