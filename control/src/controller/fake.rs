//! An in-memory Kubernetes API server for reconcile tests: a tower service a real
//! `kube::Client` talks to. It keeps objects by path and implements what the controller uses —
//! get, list (with equality label selectors), create, server-side apply (as a merge), merge and
//! JSON patches (also on `/status`), delete with finalizers, and garbage collection of objects
//! whose controller owner is gone — with resource versions and uids.
//!
//! A watch from resource version R answers with every change after R (objects with a newer
//! version, and tombstones of deleted ones) and then ends, after a short pause if there was
//! none; the watcher watches again from where it got. So the whole controller runs against
//! the fake, events included.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{json, Value};

/// How long a watch waits before it answers "410 Gone".
const WATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(300);

/// The fake's objects: collection path (`/api/v1/namespaces/ns/services`) → name → object.
#[derive(Default)]
struct Store {
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    version: u64,
    requests: Vec<String>,
    /// Deleted objects (collection, object with the deletion's version), for watches.
    tombstones: Vec<(String, Value)>,
}

/// A fake API server; clone it to look inside while a client uses it.
#[derive(Clone, Default)]
pub struct FakeApi {
    store: Arc<Mutex<Store>>,
}

/// A request path split into collection, name and subresource.
struct Target {
    collection: String,
    name: Option<String>,
    status: bool,
}

fn parse(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/namespaces/NS/PLURAL[/NAME[/status]] or /apis/G/V/namespaces/NS/PLURAL[...]
    let base = match parts.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => return None,
    };
    if parts.get(base) != Some(&"namespaces") || parts.len() < base + 3 {
        return None;
    }
    let collection = format!("/{}", parts[..base + 3].join("/"));
    Some(Target {
        collection,
        name: parts.get(base + 3).map(|s| s.to_string()),
        status: parts.get(base + 4) == Some(&"status"),
    })
}

fn status_error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    let mut response = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
    *response.status_mut() = code;
    response
}

fn ok(value: &Value) -> Response<Body> {
    Response::new(Body::from(serde_json::to_vec(value).unwrap()))
}

fn query(uri: &http::Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| {
            v.replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/")
        })
    })
}

fn matches_selector(object: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let Some((k, v)) = term.split_once('=') else {
            return false;
        };
        object["metadata"]["labels"][k].as_str() == Some(v)
    })
}

impl FakeApi {
    /// A kube client talking to this fake, with `namespace` as its default.
    pub fn client(&self, namespace: &str) -> kube::Client {
        let fake = self.clone();
        let service = tower::service_fn(move |request: Request<Body>| {
            let fake = fake.clone();
            async move { Ok::<_, std::convert::Infallible>(fake.handle(request).await) }
        });
        kube::Client::new(service, namespace)
    }

    /// Puts `object` (JSON, with `metadata.name`) into the collection at `collection`.
    pub fn insert(&self, collection: &str, object: Value) {
        let mut store = self.store.lock().unwrap();
        let object = stamp(&mut store, object, None);
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        store
            .objects
            .entry(collection.to_string())
            .or_default()
            .insert(name, object);
    }

    /// The object `name` in `collection`, if present.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        let store = self.store.lock().unwrap();
        store.objects.get(collection)?.get(name).cloned()
    }

    /// Names of the objects in `collection`.
    pub fn names(&self, collection: &str) -> Vec<String> {
        let store = self.store.lock().unwrap();
        store
            .objects
            .get(collection)
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every request so far (`METHOD path`), and forgets them.
    pub fn take_requests(&self) -> Vec<String> {
        std::mem::take(&mut self.store.lock().unwrap().requests)
    }

    async fn handle(&self, request: Request<Body>) -> Response<Body> {
        if query(request.uri(), "watch").as_deref() == Some("true") {
            return self.watch(request.uri()).await;
        }
        let (parts, body) = request.into_parts();
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        };
        let path = parts.uri.path().to_string();
        let mut store = self.store.lock().unwrap();
        store.requests.push(format!("{} {}", parts.method, path));
        let Some(target) = parse(&path) else {
            return status_error(StatusCode::NOT_FOUND, "NotFound", "unknown path");
        };
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) => {
                    return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string())
                }
            }
        };
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let existing = target
            .name
            .as_ref()
            .and_then(|n| store.objects.get(&target.collection)?.get(n).cloned());
        match (&parts.method, &target.name) {
            (&Method::GET, None) => {
                let selector = query(&parts.uri, "labelSelector").unwrap_or_default();
                let items: Vec<Value> = store
                    .objects
                    .get(&target.collection)
                    .map(|c| {
                        c.values()
                            .filter(|o| matches_selector(o, &selector))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                let version = store.version.to_string();
                ok(&json!({"apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": version}, "items": items}))
            }
            (&Method::GET, Some(_)) => match existing {
                Some(object) => ok(&object),
                None => status_error(StatusCode::NOT_FOUND, "NotFound", "not found"),
            },
            (&Method::POST, None) => {
                let name = body["metadata"]["name"].as_str().unwrap_or("").to_string();
                if store
                    .objects
                    .get(&target.collection)
                    .is_some_and(|c| c.contains_key(&name))
                {
                    return status_error(StatusCode::CONFLICT, "AlreadyExists", "already exists");
                }
                let object = stamp(&mut store, body, None);
                store
                    .objects
                    .entry(target.collection.clone())
                    .or_default()
                    .insert(name, object.clone());
                ok(&object)
            }
            (&Method::PATCH, Some(name)) => {
                let mut object = match (existing, content_type.contains("apply-patch")) {
                    (Some(object), _) => object,
                    (None, true) => json!({"metadata": {"name": name}}),
                    (None, false) => {
                        return status_error(StatusCode::NOT_FOUND, "NotFound", "not found")
                    }
                };
                let previous = object.clone();
                if content_type.contains("json-patch") {
                    let patch: json_patch::Patch = match serde_json::from_value(body) {
                        Ok(p) => p,
                        Err(e) => {
                            return status_error(
                                StatusCode::BAD_REQUEST,
                                "BadRequest",
                                &e.to_string(),
                            )
                        }
                    };
                    if let Err(e) = json_patch::patch(&mut object, &patch) {
                        return status_error(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            &e.to_string(),
                        );
                    }
                } else if target.status {
                    json_patch::merge(&mut object["status"], &body["status"]);
                } else {
                    let mut body = body;
                    // The status subresource is only written through /status.
                    if let Some(map) = body.as_object_mut() {
                        map.remove("status");
                    }
                    json_patch::merge(&mut object, &body);
                }
                let object = if object == previous {
                    object
                } else {
                    stamp(&mut store, object, Some(&previous))
                };
                let deleting = object["metadata"]["deletionTimestamp"].is_string();
                let finalizers = object["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
                if deleting && !finalizers {
                    remove(&mut store, &target.collection, name);
                } else {
                    store
                        .objects
                        .entry(target.collection.clone())
                        .or_default()
                        .insert(name.clone(), object.clone());
                }
                ok(&object)
            }
            (&Method::DELETE, Some(name)) => match existing {
                None => status_error(StatusCode::NOT_FOUND, "NotFound", "not found"),
                Some(mut object) => {
                    let finalizers = object["metadata"]["finalizers"]
                        .as_array()
                        .is_some_and(|f| !f.is_empty());
                    if finalizers {
                        object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                        let object = stamp(&mut store, object, None);
                        store
                            .objects
                            .get_mut(&target.collection)
                            .unwrap()
                            .insert(name.clone(), object.clone());
                        ok(&object)
                    } else {
                        remove(&mut store, &target.collection, name);
                        ok(&object)
                    }
                }
            },
            _ => status_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "unsupported",
            ),
        }
    }
}

impl FakeApi {
    /// The changes after the watch's resource version, as watch events (one JSON per line).
    async fn watch(&self, uri: &http::Uri) -> Response<Body> {
        let Some(target) = parse(uri.path()) else {
            return status_error(StatusCode::NOT_FOUND, "NotFound", "unknown path");
        };
        let since: u64 = query(uri, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let selector = query(uri, "labelSelector").unwrap_or_default();
        let version = |o: &Value| {
            o["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        for attempt in 0..2 {
            let mut events: Vec<(u64, &str, Value)> = Vec::new();
            {
                let store = self.store.lock().unwrap();
                if let Some(objects) = store.objects.get(&target.collection) {
                    for object in objects.values() {
                        if version(object) > since && matches_selector(object, &selector) {
                            events.push((version(object), "MODIFIED", object.clone()));
                        }
                    }
                }
                for (collection, object) in &store.tombstones {
                    if *collection == target.collection
                        && version(object) > since
                        && matches_selector(object, &selector)
                    {
                        events.push((version(object), "DELETED", object.clone()));
                    }
                }
            }
            if !events.is_empty() || attempt == 1 {
                events.sort_by_key(|(v, _, _)| *v);
                let mut body = Vec::new();
                for (_, kind, object) in events {
                    serde_json::to_writer(&mut body, &json!({"type": kind, "object": object}))
                        .unwrap();
                    body.push(b'\n');
                }
                return Response::new(Body::from(body));
            }
            tokio::time::sleep(WATCH_PAUSE).await;
        }
        unreachable!("the second attempt always answers")
    }
}

/// Gives `object` a new resource version (and a uid and namespace on creation).
fn stamp(store: &mut Store, mut object: Value, previous: Option<&Value>) -> Value {
    store.version += 1;
    let meta = &mut object["metadata"];
    meta["resourceVersion"] = json!(store.version.to_string());
    if meta["uid"].is_null() {
        meta["uid"] = previous
            .map(|p| p["metadata"]["uid"].clone())
            .unwrap_or_else(|| json!(format!("uid-{}", store.version)));
    }
    // Like the real server's patch engine, a JSON patch `test` of an absent list sees null.
    if meta.get("finalizers").is_none() {
        meta["finalizers"] = Value::Null;
    }
    if meta["creationTimestamp"].is_null() {
        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    object
}

/// Removes an object and, like the garbage collector, everything it controls.
fn remove(store: &mut Store, collection: &str, name: &str) {
    let Some(object) = store
        .objects
        .get_mut(collection)
        .and_then(|c| c.remove(name))
    else {
        return;
    };
    let uid = object["metadata"]["uid"].clone();
    let mut owned = Vec::new();
    for (collection, objects) in &store.objects {
        for (name, object) in objects {
            let references = object["metadata"]["ownerReferences"].as_array();
            if references.is_some_and(|r| r.iter().any(|o| o["uid"] == uid)) {
                owned.push((collection.clone(), name.clone()));
            }
        }
    }
    for (collection, name) in owned {
        let finalizers = store.objects[&collection][&name]["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if finalizers {
            let object = store
                .objects
                .get_mut(&collection)
                .unwrap()
                .get_mut(&name)
                .unwrap();
            object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            let object = object.clone();
            let object = stamp(store, object, None);
            store
                .objects
                .get_mut(&collection)
                .unwrap()
                .insert(name, object);
        } else {
            remove(store, &collection, &name);
        }
    }
}
