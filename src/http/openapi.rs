//! `GET /openapi.json`: the OpenAPI 3.0 description of the HTTP API.
//!
//! `openapi.json` beside this file is the description, written by hand (the API is small
//! and stable, and a generator would be a dependency for seven routes). At start it is
//! completed with what this instance's settings decide, so that the served document is
//! exact: one item schema per configured part (its type and dimension), the id and batch
//! limits, an example batch that is accepted, and, when `http.auth_token` is empty, no
//! security requirement and no 401 answers.

use actix_web::web::{self, Bytes};
use actix_web::HttpResponse;
use serde_json::{json, Value};

use crate::config::Settings;

/// The hand-written description, before the settings are filled in.
pub const TEMPLATE: &str = include_str!("openapi.json");

/// The served document, rendered once at start.
#[derive(Clone)]
pub struct OpenApi(Bytes);

impl OpenApi {
    pub fn new(settings: &Settings) -> OpenApi {
        let doc = document(settings);
        OpenApi(Bytes::from(serde_json::to_vec(&doc).expect("a JSON value serialises")))
    }
}

pub async fn serve(doc: web::Data<OpenApi>) -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(doc.0.clone())
}

/// The description of this instance's API.
pub fn document(settings: &Settings) -> Value {
    let mut doc: Value = serde_json::from_str(TEMPLATE).expect("openapi.json is valid JSON");
    let schemas = &mut doc["components"]["schemas"];
    schemas["IngestRequest"]["properties"]["embeddings"]["maxItems"] = json!(settings.http.max_batch_items);
    // One variant of the item per configured part, with its type and dimension, so that
    // the schema accepts exactly the items ingress takes (but for id bytes and metadata keys).
    let mut item = schemas["Item"].take();
    item["properties"]["id"]["maxLength"] = json!(settings.http.max_id_bytes);
    let variants: Vec<Value> = settings
        .parts
        .iter()
        .map(|p| {
            let mut variant = item.clone();
            variant["title"] = json!(p.type_name);
            variant["properties"]["embedding_type"]["enum"] = json!([p.type_name]);
            let embedding = &mut variant["properties"]["embedding"];
            embedding["minItems"] = json!(p.dims);
            embedding["maxItems"] = json!(p.dims);
            variant
        })
        .collect();
    schemas["Item"] = json!({"description": item["description"], "oneOf": variants});
    // One item per part, all accepted: examples make a fuzzer reach the 202 path too.
    let example: Vec<Value> = settings
        .parts
        .iter()
        // Unit length: taken whatever `elasticsearch.similarity` is.
        .map(|p| json!({"id": "sku-1", "embedding_type": p.type_name, "embedding": vec![1.0 / (p.dims as f32).sqrt(); p.dims]}))
        .collect();
    doc["components"]["requestBodies"]["Ingest"]["content"]["application/json"]["example"] =
        json!({ "embeddings": example });
    if settings.http.auth_token.is_empty() {
        remove_security(&mut doc);
    }
    doc
}

/// Without a token nothing is authenticated: no operation needs it, none answers 401.
fn remove_security(doc: &mut Value) {
    if let Some(paths) = doc["paths"].as_object_mut() {
        for operation in paths.values_mut().filter_map(Value::as_object_mut).flat_map(|p| p.values_mut()) {
            if let Some(operation) = operation.as_object_mut() {
                operation.remove("security");
                if let Some(responses) = operation.get_mut("responses").and_then(Value::as_object_mut) {
                    responses.remove("401");
                }
            }
        }
    }
    if let Some(components) = doc["components"].as_object_mut() {
        components.remove("securitySchemes");
        if let Some(responses) = components.get_mut("responses").and_then(Value::as_object_mut) {
            responses.remove("Unauthorized");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_carries_the_configured_parts_and_limits() {
        let settings = Settings::defaults();
        let doc = document(&settings);
        assert_eq!(doc["openapi"], "3.0.3");
        let variants = &doc["components"]["schemas"]["Item"]["oneOf"];
        let image = &variants[1]["properties"];
        assert_eq!(variants[0]["properties"]["embedding_type"]["enum"], json!(["EMBEDDINGS_TEXT"]));
        assert_eq!(image["embedding_type"]["enum"], json!(["EMBEDDINGS_IMAGE"]));
        assert_eq!((&image["embedding"]["minItems"], &image["embedding"]["maxItems"]), (&json!(512), &json!(512)));
        assert_eq!(image["id"]["maxLength"], 512);
        let example = &doc["components"]["requestBodies"]["Ingest"]["content"]["application/json"]["example"];
        assert_eq!(example["embeddings"][1]["embedding"].as_array().unwrap().len(), 512);
        // No token: no security anywhere, and no dangling reference to the 401 answer.
        let text = doc.to_string();
        assert!(!text.contains("bearerAuth") && !text.contains("Unauthorized"), "{text}");
    }

    #[test]
    fn a_token_makes_the_data_endpoints_require_it() {
        let mut settings = Settings::defaults();
        settings.http.auth_token = "t0ken".into();
        let doc = document(&settings);
        assert_eq!(doc["paths"]["/aggregate/"]["post"]["security"], json!([{"bearerAuth": []}]));
        assert!(doc["paths"]["/documents/{id}"]["get"]["responses"]["401"].is_object());
        assert!(doc["paths"]["/health"]["get"].get("security").is_none());
    }
}
