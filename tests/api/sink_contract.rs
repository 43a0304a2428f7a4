//! The file sink's contract: each `_bulk` body appended exactly, every item answered 201,
//! files rotated by size, and a reopened sink continuing the highest-numbered file.

use std::path::Path;
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use embedjoin::config::{FileSettings, PartSettings, VectorEncoding};
use embedjoin::model::{Document, Schema};
use embedjoin::sink::encode::{encode_op, Action};
use embedjoin::sink::file::{file_name, FileSink};

fn schema() -> Schema {
    Schema::new(&[
        PartSettings { type_name: "T".into(), field: "text_embedding".into(), dims: 2 },
        PartSettings { type_name: "I".into(), field: "image_embedding".into(), dims: 3 },
    ])
}

/// A `_bulk` body of one operation per id, as the writer builds it.
fn body(ids: &[&str]) -> Bytes {
    let schema = schema();
    let mut buf = BytesMut::new();
    for id in ids {
        let doc = Document {
            id: id.to_string(),
            vectors: vec![vec![0.5, -1.0], vec![1.0, 2.0, 3.0]],
            stamps: vec![1, 2],
            metadata: None,
            completed_at: SystemTime::now(),
            received_at: Instant::now(),
            origin: embedjoin::model::document::Origin::Memory,
            orphan: None,
            update: false,
            acks: Vec::new(),
        };
        encode_op(&mut buf, &doc, &schema, VectorEncoding::Array, Action::Index);
    }
    buf.freeze()
}

fn sink(dir: &Path, max_bytes: u64) -> FileSink {
    FileSink::new(&FileSettings { dir: dir.to_path_buf(), max_bytes })
}

/// The output files in `dir`, by name, with their contents.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap()))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn file_sink_appends_each_body_exactly_and_answers_every_item_201() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out"); // created on first use
    let sink = sink(&out, 1 << 20);
    let (first, second) = (body(&["a", "b", "c"]), body(&["d"]));
    let statuses = sink.bulk(first.clone(), 3).await.unwrap();
    assert_eq!(statuses.len(), 3);
    assert!(statuses.iter().all(|s| s.status == 201 && s.error.is_none()), "{statuses:?}");
    assert_eq!(sink.bulk(second.clone(), 1).await.unwrap().len(), 1);
    assert_eq!(files(&out), vec![(file_name(1), [first, second].concat())]);
}

#[tokio::test]
async fn file_sink_rotates_before_a_batch_would_pass_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (body(&["a"]), body(&["b", "c"]));
    // Room for two single-operation bodies, not for a third.
    let sink = sink(dir.path(), (one.len() * 2 + one.len() / 2) as u64);
    for _ in 0..2 {
        sink.bulk(one.clone(), 1).await.unwrap();
    }
    sink.bulk(one.clone(), 1).await.unwrap(); // a third would pass the limit: file 2
    sink.bulk(two.clone(), 2).await.unwrap(); // no room left beside it: file 3
                                              // Larger than the limit on its own: it goes alone into the next file, not split.
    let big = body(&["d", "e", "f", "g"]);
    sink.bulk(big.clone(), 4).await.unwrap();
    assert_eq!(
        files(dir.path()),
        vec![
            (file_name(1), [one.clone(), one.clone()].concat()),
            (file_name(2), one.to_vec()),
            (file_name(3), two.to_vec()),
            (file_name(4), big.to_vec()),
        ]
    );
}

#[tokio::test]
async fn a_reopened_file_sink_continues_the_highest_numbered_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = body(&["a"]);
    let max = (a.len() * 2) as u64;
    let first = sink(dir.path(), max);
    for _ in 0..3 {
        first.bulk(a.clone(), 1).await.unwrap(); // file 1 twice, then file 2
    }
    drop(first);
    std::fs::write(dir.path().join("notes.txt"), "not an output file").unwrap();
    // A crash while writing left a torn operation at the end: it is cut back.
    let torn = dir.path().join(file_name(2));
    let mut content = std::fs::read(&torn).unwrap();
    content.extend_from_slice(&a[..a.len() - 5]);
    std::fs::write(&torn, content).unwrap();

    let second = sink(dir.path(), max);
    second.bulk(a.clone(), 1).await.unwrap(); // fills file 2
    second.bulk(a.clone(), 1).await.unwrap(); // starts file 3
    let names: Vec<String> = files(dir.path()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, [file_name(1), file_name(2), file_name(3), "notes.txt".into()]);
    assert_eq!(std::fs::read(&torn).unwrap(), [a.clone(), a.clone()].concat());
    assert_eq!(std::fs::read(dir.path().join(file_name(3))).unwrap(), a.to_vec());
}
