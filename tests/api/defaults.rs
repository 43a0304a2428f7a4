//! The service as it ships: the built-in defaults (embedded state store, file sink) need no
//! server at all; only the port and the data directories are changed for the test.

use std::path::Path;
use std::time::{Duration, Instant};

use embedjoin::Settings;
use serde_json::Value;

use crate::support::app::spawn_app;
use crate::support::data::{batch, item, stored_vector, vector, IMAGE, TEXT};

/// Every line of the output files in `dir`, in file order.
fn output_lines(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths
        .iter()
        .flat_map(|p| std::fs::read_to_string(p).unwrap().lines().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// The source line of `id`'s operation, once it is in the output.
fn source_of(lines: &[String], id: &str) -> Option<Value> {
    let at = lines.iter().position(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["update"]["_id"] == id))?;
    let body: Value = serde_json::from_str(lines.get(at + 1)?).ok()?;
    Some(body["script"]["params"]["d"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_defaults_join_parts_into_a_bulk_file_with_no_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::defaults();
    settings.http.bind = "127.0.0.1:0".into();
    settings.embedded.path = dir.path().join("data").join("embedjoin.db");
    settings.file.dir = dir.path().join("data").join("out");
    let out = settings.file.dir.clone();
    let app = spawn_app(settings).await;

    assert_eq!(app.post_json(&batch(vec![item("sku-1", TEXT, 384)])).await.status(), 202);
    assert_eq!(app.post_json(&batch(vec![item("sku-1", IMAGE, 512)])).await.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(30);
    let source = loop {
        if let Some(source) = source_of(&output_lines(&out), "sku-1") {
            break source;
        }
        assert!(Instant::now() < deadline, "sku-1 did not reach {}", out.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(source["id"], "sku-1");
    assert_eq!(stored_vector(&source, "text_embedding"), vector("sku-1", TEXT, 384, 0));
    assert_eq!(stored_vector(&source, "image_embedding"), vector("sku-1", IMAGE, 512, 0));
    assert!(source["completed_at"].is_string());
    app.stop().await.unwrap();

    // After shutdown the file is a valid `_bulk` body: action and body lines in pairs, the
    // document exactly once, as the guarded upsert (`state.late_parts = "update"`): loaded
    // later, each part is written only if newer than the one indexed.
    let lines = output_lines(&out);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let action: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(action["update"]["_id"], "sku-1");
    let body: Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(body["scripted_upsert"], true);
    assert_eq!(body["upsert"], serde_json::json!({}));
    assert_eq!(body["script"]["source"], embedjoin::sink::encode::MERGE_SCRIPT);
    assert!(source["_parts"]["EMBEDDINGS_TEXT"].as_u64().is_some_and(|v| v > 0), "{source}");
    assert!(source["_parts"]["EMBEDDINGS_IMAGE"].as_u64().is_some_and(|v| v > 0), "{source}");
    assert!(std::fs::read(out.join("embedjoin-000001.ndjson")).unwrap().ends_with(b"\n"));
    assert!(dir.path().join("data").join("embedjoin.db").exists(), "the state store is on disk");
}
