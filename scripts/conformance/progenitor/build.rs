//! Generates the client from the committed customer document with progenitor's defaults.
use std::{env, fs, path::Path};

fn main() {
    let doc = env::var("SDK_DOC").unwrap_or_else(|_| "../../../api/openapi.json".to_string());
    println!("cargo:rerun-if-changed={doc}");
    println!("cargo:rerun-if-env-changed=SDK_DOC");
    let spec: openapiv3::OpenAPI =
        serde_json::from_reader(fs::File::open(&doc).expect("open the document")).expect("parse");
    let mut generator = progenitor::Generator::default();
    let tokens = generator
        .generate_tokens(&spec)
        .expect("progenitor generates the client");
    let file = syn::parse2(tokens).expect("generated code parses");
    let out = Path::new(&env::var("OUT_DIR").unwrap()).join("client.rs");
    fs::write(out, prettyplease::unparse(&file)).unwrap();
}
