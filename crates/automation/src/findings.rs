//! A review agent's findings, and their placement on the lines of a pull request's diff.
//!
//! The agent ends with a JSON object `{"summary": "...", "comments": [{"path", "line",
//! "body"}]}`, in a fenced block or inline in its last message; the last JSON object that
//! has a `summary` or `comments` field is taken (an earlier one may be quoted from the code),
//! and text without one becomes the summary with no comments. GitHub accepts an
//! inline comment only on a line the diff shows (REST API "Create a review for a pull
//! request": otherwise 422 "Line could not be resolved"), so each comment is checked against
//! the right-hand lines of the diff's hunks; comments that do not map are listed in the
//! review's summary instead.

use std::collections::{BTreeSet, HashMap};

use globset::GlobSet;
use serde::Deserialize;
use serde_json::Value;

use crate::github::{ReviewBody, ReviewComment};

/// Most inline comments posted in one review.
pub const MAX_COMMENTS: usize = 50;
/// Most characters of one comment.
pub const MAX_COMMENT_CHARS: usize = 4_000;

/// One finding of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Finding {
    /// File path relative to the repository root.
    pub path: String,
    /// Line in the new version of the file.
    pub line: u64,
    /// Markdown text.
    pub body: String,
}

/// What the agent reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Findings {
    /// The overall assessment.
    #[serde(default)]
    pub summary: String,
    /// Line comments.
    #[serde(default)]
    pub comments: Vec<Finding>,
}

/// Extracts [`Findings`] from the agent's final message (see the module docs).
pub fn parse_findings(text: &str) -> Findings {
    let fenced = text.split("```").skip(1).step_by(2).map(|block| {
        // Drop an info string such as `json`.
        block
            .split_once('\n')
            .map(|(info, rest)| if info.contains('{') { block } else { rest })
            .unwrap_or(block)
    });
    let inline = text.match_indices('{').map(|(i, _)| &text[i..]);
    // The agent ends with its findings: an earlier object (quoted from the code) loses.
    let last = fenced
        .chain(inline)
        .filter_map(|candidate| {
            let mut values =
                serde_json::Deserializer::from_str(candidate.trim()).into_iter::<Value>();
            let value = values.next()?.ok()?;
            (value.get("summary").is_some() || value.get("comments").is_some())
                .then(|| serde_json::from_value::<Findings>(value).ok())
                .flatten()
        })
        .last();
    if let Some(findings) = last {
        return findings;
    }
    Findings {
        summary: text.trim().to_owned(),
        comments: Vec::new(),
    }
}

/// The lines of the new version of each file that a unified diff shows (added and context
/// lines), by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffLines {
    files: HashMap<String, BTreeSet<u64>>,
}

impl DiffLines {
    /// Parses a `git diff` (as GitHub's diff media type returns it). Each hunk is read for
    /// exactly the line counts its `@@ -a,b +c,d @@` header gives.
    pub fn parse(diff: &str) -> Self {
        let mut files: HashMap<String, BTreeSet<u64>> = HashMap::new();
        let mut current: Option<String> = None;
        let (mut line, mut old_left, mut new_left) = (0u64, 0u64, 0u64);
        for text in diff.lines() {
            if old_left > 0 || new_left > 0 {
                match text.as_bytes().first() {
                    Some(b'-') => old_left = old_left.saturating_sub(1),
                    Some(b'\\') => {}
                    Some(b'+') => {
                        if let Some(path) = &current {
                            files.entry(path.clone()).or_default().insert(line);
                        }
                        line += 1;
                        new_left = new_left.saturating_sub(1);
                    }
                    // A context line (an empty one lost its leading space somewhere).
                    _ => {
                        if let Some(path) = &current {
                            files.entry(path.clone()).or_default().insert(line);
                        }
                        line += 1;
                        old_left = old_left.saturating_sub(1);
                        new_left = new_left.saturating_sub(1);
                    }
                }
            } else if text.starts_with("diff --git ") {
                current = None;
            } else if let Some(path) = text.strip_prefix("+++ ") {
                // git ends a name holding a space with a tab.
                current = path
                    .trim_end_matches('\t')
                    .strip_prefix("b/")
                    .map(str::to_owned);
            } else if let Some(header) = text.strip_prefix("@@ ") {
                let range = |sign: char| -> (u64, u64) {
                    let r = header
                        .split_whitespace()
                        .find_map(|r| r.strip_prefix(sign))
                        .unwrap_or("0");
                    let (start, count) = r.split_once(',').unwrap_or((r, "1"));
                    (start.parse().unwrap_or(0), count.parse().unwrap_or(0))
                };
                (_, old_left) = range('-');
                (line, new_left) = range('+');
            }
        }
        Self { files }
    }

    /// Whether `line` of `path` can carry an inline comment.
    pub fn contains(&self, path: &str, line: u64) -> bool {
        self.files.get(path).is_some_and(|l| l.contains(&line))
    }

    /// Paths in the diff.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }
}

/// Keeps only the files of `diff` whose path does not match `ignore`.
pub fn filter_diff(diff: &str, ignore: &GlobSet) -> String {
    if ignore.is_empty() {
        return diff.to_owned();
    }
    let mut out = String::with_capacity(diff.len());
    let mut keep = true;
    for chunk in diff.split_inclusive('\n') {
        if let Some(rest) = chunk.strip_prefix("diff --git ") {
            let path = rest
                .trim_end()
                .rsplit_once(" b/")
                .map(|(_, p)| p)
                .unwrap_or("");
            keep = !ignore.is_match(path);
        }
        if keep {
            out.push_str(chunk);
        }
    }
    out
}

/// The review to post: findings on diff lines become inline comments (at most
/// [`MAX_COMMENTS`]); the others, and ignored paths, are listed in the summary.
pub fn build_review(
    findings: &Findings,
    lines: &DiffLines,
    ignore: &GlobSet,
    head_sha: &str,
) -> ReviewBody {
    let mut comments = Vec::new();
    let mut unplaced = Vec::new();
    for f in &findings.comments {
        let path = f.path.trim_start_matches("./").to_owned();
        let body: String = f.body.chars().take(MAX_COMMENT_CHARS).collect();
        if body.trim().is_empty() || ignore.is_match(&path) {
            continue;
        }
        if comments.len() < MAX_COMMENTS && lines.contains(&path, f.line) {
            comments.push(ReviewComment {
                path,
                line: f.line,
                side: "RIGHT".into(),
                body,
            });
        } else {
            unplaced.push(format!("- `{path}` line {}: {body}", f.line));
        }
    }
    let mut body = if findings.summary.trim().is_empty() {
        "Review complete.".to_owned()
    } else {
        findings.summary.trim().to_owned()
    };
    if !unplaced.is_empty() {
        body.push_str("\n\n**Findings outside the diff**\n\n");
        body.push_str(&unplaced.join("\n"));
    }
    ReviewBody {
        commit_id: head_sha.to_owned(),
        body,
        event: "COMMENT".into(),
        comments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIFF: &str = "diff --git a/src/lib.rs b/src/lib.rs
index 1111111..2222222 100644
--- a/src/lib.rs
+++ b/src/lib.rs
@@ -1,3 +1,4 @@
 fn a() {}
-fn b() {}
+fn b() { todo() }
+fn c() {}

diff --git a/README.md b/README.md
new file mode 100644
--- /dev/null
+++ b/README.md
@@ -0,0 +1,2 @@
+# Title
+text
diff --git a/logo.png b/logo.png
Binary files a/logo.png and b/logo.png differ
";

    #[test]
    fn diff_lines_are_the_new_side_of_each_hunk() {
        let lines = DiffLines::parse(DIFF);
        assert!(lines.contains("src/lib.rs", 1));
        assert!(lines.contains("src/lib.rs", 2));
        assert!(lines.contains("src/lib.rs", 3));
        assert!(lines.contains("src/lib.rs", 4));
        assert!(!lines.contains("src/lib.rs", 5));
        assert!(lines.contains("README.md", 1));
        assert!(lines.contains("README.md", 2));
        assert!(!lines.contains("logo.png", 1));
    }

    #[test]
    fn the_last_findings_object_wins() {
        let text = "The fixture holds ```json\n{\"summary\": \"quoted\", \"comments\": []}\n``` so:\n{\"summary\": \"final\", \"comments\": []}";
        assert_eq!(parse_findings(text).summary, "final");
    }

    #[test]
    fn findings_come_from_fenced_or_inline_json_or_plain_text() {
        let fenced = "Done.\n```json\n{\"summary\": \"ok\", \"comments\": [{\"path\": \"a\", \"line\": 2, \"body\": \"x\"}]}\n```";
        let f = parse_findings(fenced);
        assert_eq!(f.summary, "ok");
        assert_eq!(f.comments.len(), 1);
        let inline = r#"Here: {"summary": "s", "comments": []} thanks"#;
        assert_eq!(parse_findings(inline).summary, "s");
        let plain = parse_findings("Looks good to me.");
        assert_eq!(plain.summary, "Looks good to me.");
        assert!(plain.comments.is_empty());
    }

    #[test]
    fn comments_off_the_diff_go_to_the_summary() {
        let findings = Findings {
            summary: "Two issues.".into(),
            comments: vec![
                Finding {
                    path: "src/lib.rs".into(),
                    line: 2,
                    body: "b panics".into(),
                },
                Finding {
                    path: "src/lib.rs".into(),
                    line: 40,
                    body: "far away".into(),
                },
                Finding {
                    path: "vendor/x.rs".into(),
                    line: 1,
                    body: "ignored".into(),
                },
            ],
        };
        let ignore = globset::GlobSetBuilder::new()
            .add(globset::Glob::new("vendor/**").unwrap())
            .build()
            .unwrap();
        let review = build_review(&findings, &DiffLines::parse(DIFF), &ignore, "abc");
        assert_eq!(review.comments.len(), 1);
        assert_eq!(review.comments[0].line, 2);
        assert!(review.body.contains("line 40: far away"));
        assert!(!review.body.contains("ignored"));
        assert_eq!(review.commit_id, "abc");
        let filtered = filter_diff(DIFF, &ignore);
        assert_eq!(filtered, DIFF);
        let no_readme = globset::GlobSetBuilder::new()
            .add(globset::Glob::new("*.md").unwrap())
            .build()
            .unwrap();
        let filtered = filter_diff(DIFF, &no_readme);
        assert!(!filtered.contains("README"));
        assert!(filtered.contains("src/lib.rs") && filtered.contains("logo.png"));
    }
}
