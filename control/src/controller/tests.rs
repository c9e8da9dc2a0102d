//! The reconcilers against real site daemons (in this process, on loopback) and two kinds of
//! API server: tower-test's mock, where each test states the exact requests it expects
//! (`ApiServerVerifier` scenarios), and the in-memory [`FakeApi`], for whole flows.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::ResourceExt;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use super::fake::FakeApi;
use super::reconcile::{self, Context, FINALIZER};
use super::resources;
use crate::admin::{self, ConnectorView, LinkView, ListenerView};
use crate::crd::{
    AccessGrant, AccessTokenResource, Connector, ConnectorSpec, Link, LinkStatus, Listener,
    ListenerSpec,
};

const NS: &str = "skiff";
const LISTENERS: &str = "/apis/skiff.dev/v1alpha1/namespaces/skiff/listeners";
const CONNECTORS: &str = "/apis/skiff.dev/v1alpha1/namespaces/skiff/connectors";
const GRANTS: &str = "/apis/skiff.dev/v1alpha1/namespaces/skiff/accessgrants";
const TOKENS: &str = "/apis/skiff.dev/v1alpha1/namespaces/skiff/accesstokens";
const LINKS: &str = "/apis/skiff.dev/v1alpha1/namespaces/skiff/links";
const SERVICES: &str = "/api/v1/namespaces/skiff/services";
const SECRETS: &str = "/api/v1/namespaces/skiff/secrets";
const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/skiff/endpointslices";

/// A site daemon running in this process.
struct TestSite {
    dir: TempDir,
    stop: CancellationToken,
    /// The runtimes of the router's further shards.
    shards: Vec<tokio::runtime::Runtime>,
}

impl TestSite {
    /// A site with one shard, the test's own runtime.
    async fn start(name: &str) -> TestSite {
        TestSite::start_sharded(name, 1).await
    }

    /// A site whose router runs `shards` shards: the test's runtime and one more runtime of
    /// one thread for each further shard, as `skiff site run --shards` gives it.
    async fn start_sharded(name: &str, shards: usize) -> TestSite {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::new(dir.path());
        crate::init(
            &store,
            crate::InitOptions {
                name: name.into(),
                link_hosts: vec!["127.0.0.1".into()],
                link_port: 0,
                quic_port: None,
                metrics_addr: None,
                cert_lifetime: Duration::from_secs(3600),
            },
        )
        .unwrap();
        let listeners = crate::Listeners {
            link: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: admin::bind(&store.admin_socket()).unwrap(),
            metrics: None,
            quic: None,
        };
        let stop = CancellationToken::new();
        let shards: Vec<tokio::runtime::Runtime> = (1..shards)
            .map(|_| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap()
            })
            .collect();
        let options = crate::site::RunOptions {
            access_log: false,
            shards: shards.iter().map(|r| r.handle().clone()).collect(),
            ..Default::default()
        };
        tokio::spawn(crate::site::run_with(
            store,
            listeners,
            options,
            stop.clone(),
        ));
        let site = TestSite { dir, stop, shards };
        for _ in 0..100 {
            if site
                .admin()
                .get::<admin::StatusView>("/v1/status")
                .await
                .is_ok()
            {
                return site;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("site {name} did not start");
    }

    fn admin(&self) -> admin::Client {
        admin::Client::new(self.dir.path())
    }

    fn context(&self, client: kube::Client) -> Arc<Context> {
        Arc::new(Context {
            client,
            namespace: NS.into(),
            site: self.admin(),
            router_selector: BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                "skiff".to_string(),
            )]),
            reachable: true.into(),
        })
    }
}

impl Drop for TestSite {
    fn drop(&mut self) {
        self.stop.cancel();
        // A test's async context may not block on a runtime's shutdown.
        for shard in self.shards.drain(..) {
            shard.shutdown_background();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn listener_object(port: u16) -> Listener {
    let mut listener = Listener::new(
        "web",
        ListenerSpec {
            routing_key: "web".into(),
            port,
            host: None,
            strategy: None,
        },
    );
    listener.metadata.namespace = Some(NS.into());
    listener.metadata.uid = Some("uid-listener".into());
    listener.metadata.finalizers = Some(vec![FINALIZER.into()]);
    listener
}

fn connector_object() -> Connector {
    let mut connector = Connector::new(
        "db",
        ConnectorSpec {
            routing_key: "db".into(),
            port: 5432,
            selector: Some(BTreeMap::from([("app".into(), "db".into())])),
            host: None,
            weight: None,
        },
    );
    connector.metadata.namespace = Some(NS.into());
    connector.metadata.uid = Some("uid-connector".into());
    connector.metadata.finalizers = Some(vec![FINALIZER.into()]);
    connector
}

fn slice(addresses: &[(&str, bool)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "skiff-connector-db-abcde",
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": "skiff-connector-db"},
        },
        "addressType": "IPv4",
        "endpoints": addresses.iter().map(|(ip, ready)| json!({
            "addresses": [ip], "conditions": {"ready": ready},
        })).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------------------
// ApiServerVerifier scenarios: the exact requests, in order.

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn mock_client() -> (kube::Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, NS), handle)
}

/// Takes the next request, checks method and path, and returns its JSON body.
async fn expect(
    handle: &mut std::pin::Pin<&mut Handle>,
    method: Method,
    path: &str,
) -> (
    Value,
    tower_test::mock::SendResponse<Response<Body>>,
    String,
) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
        .expect("the client went away");
    assert_eq!(request.method(), method, "{}", request.uri());
    assert_eq!(request.uri().path(), path);
    let uri = request.uri().to_string();
    let bytes = request.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (body, send, uri)
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, value: &Value) {
    send.send_response(Response::new(Body::from(
        serde_json::to_vec(value).unwrap(),
    )));
}

fn respond_not_found(send: tower_test::mock::SendResponse<Response<Body>>) {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": "NotFound", "code": 404, "message": "not found", "metadata": {}});
    let mut response = Response::new(Body::from(serde_json::to_vec(&status).unwrap()));
    *response.status_mut() = http::StatusCode::NOT_FOUND;
    send.send_response(response);
}

#[tokio::test]
async fn verifier_a_listener_gets_its_service_and_its_status() {
    let site = TestSite::start("dev").await;
    let (client, handle) = mock_client();
    let ctx = site.context(client);
    let port = free_port();
    let listener = listener_object(port);
    let verifier = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let (_, send, _) = expect(&mut handle, Method::GET, &format!("{SERVICES}/web")).await;
        respond_not_found(send);
        let (service, send, uri) =
            expect(&mut handle, Method::PATCH, &format!("{SERVICES}/web")).await;
        assert!(uri.contains("fieldManager=skiff"), "{uri}");
        assert_eq!(service["spec"]["type"], "ClusterIP");
        assert_eq!(service["spec"]["ports"][0]["port"], port);
        assert_eq!(service["spec"]["ports"][0]["targetPort"], port);
        assert_eq!(
            service["spec"]["selector"]["app.kubernetes.io/name"],
            "skiff"
        );
        assert_eq!(
            service["metadata"]["ownerReferences"][0]["uid"],
            "uid-listener"
        );
        assert_eq!(
            service["metadata"]["ownerReferences"][0]["kind"],
            "Listener"
        );
        respond(send, &service);
        let (patch, send, _) = expect(
            &mut handle,
            Method::PATCH,
            &format!("{LISTENERS}/web/status"),
        )
        .await;
        let conditions = patch["status"]["conditions"].as_array().unwrap().clone();
        let ready = conditions.iter().find(|c| c["type"] == "Ready").unwrap();
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "NoTargets");
        assert!(ready["message"]
            .as_str()
            .unwrap()
            .contains("routing key web"));
        respond(
            send,
            &json!({"apiVersion": "skiff.dev/v1alpha1", "kind": "Listener",
            "metadata": {"name": "web"}, "spec": {"routingKey": "web", "port": port},
            "status": patch["status"]}),
        );
    });
    let action = reconcile::listener(Arc::new(listener), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    verifier.await.unwrap();
    let listeners: Vec<ListenerView> = site.admin().get("/v1/listeners").await.unwrap();
    assert_eq!(listeners.len(), 1);
    assert_eq!(
        (listeners[0].bind.as_str(), listeners[0].port),
        ("0.0.0.0", port)
    );
    // The port is really open.
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
}

#[tokio::test]
async fn verifier_connector_backends_follow_the_ready_pods() {
    let site = TestSite::start("prod").await;
    let (client, handle) = mock_client();
    let ctx = site.context(client);
    let connector = connector_object();
    let service_path = format!("{SERVICES}/skiff-connector-db");
    let rounds = [
        vec![("10.0.0.5", true), ("10.0.0.6", false)],
        vec![("10.0.0.5", false), ("10.0.0.7", true), ("10.0.0.8", true)],
    ];
    let expected_endpoints = [
        vec!["10.0.0.5:5432"],
        vec!["10.0.0.7:5432", "10.0.0.8:5432"],
    ];
    // Round 1: one ready pod. Round 2: it is gone, two others are ready.
    let mut handle_slot = Some(handle);
    let mut ctx_slot = Some(ctx);
    for (round, pods) in rounds.into_iter().enumerate() {
        let handle = match handle_slot.take() {
            Some(h) => h,
            None => {
                let (client, h) = mock_client();
                ctx_slot = Some(site.context(client));
                h
            }
        };
        let ctx = ctx_slot.take().unwrap();
        let expected = expected_endpoints[round].clone();
        let service_path = service_path.clone();
        let verifier = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (_, send, _) = expect(&mut handle, Method::GET, &service_path).await;
            if round == 0 {
                respond_not_found(send);
            } else {
                respond(
                    send,
                    &json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "skiff-connector-db", "ownerReferences": [
                        {"apiVersion": "skiff.dev/v1alpha1", "kind": "Connector", "name": "db",
                         "uid": "uid-connector", "controller": true}]}}),
                );
            }
            let (service, send, _) = expect(&mut handle, Method::PATCH, &service_path).await;
            assert_eq!(service["spec"]["clusterIP"], "None", "headless");
            assert_eq!(service["spec"]["selector"]["app"], "db");
            respond(send, &service);
            let (_, send, uri) = expect(&mut handle, Method::GET, SLICES).await;
            assert!(
                uri.contains("labelSelector=kubernetes.io%2Fservice-name%3Dskiff-connector-db"),
                "{uri}"
            );
            respond(
                send,
                &json!({"apiVersion": "v1", "kind": "List", "metadata": {},
                "items": [slice(&pods)]}),
            );
            let (patch, send, _) = expect(
                &mut handle,
                Method::PATCH,
                &format!("{CONNECTORS}/db/status"),
            )
            .await;
            assert_eq!(patch["status"]["endpoints"], json!(expected));
            let ready = patch["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Ready")
                .unwrap()
                .clone();
            assert_eq!(ready["status"], "True");
            respond(
                send,
                &json!({"apiVersion": "skiff.dev/v1alpha1", "kind": "Connector",
                "metadata": {"name": "db"}, "spec": {"routingKey": "db", "port": 5432}}),
            );
        });
        reconcile::connector(Arc::new(connector.clone()), ctx)
            .await
            .unwrap();
        verifier.await.unwrap();
        let mut backends: Vec<ConnectorView> = site.admin().get("/v1/connectors").await.unwrap();
        backends.sort_by(|a, b| a.name.cmp(&b.name));
        let hosts: Vec<String> = backends
            .iter()
            .map(|c| format!("{}:{}", c.host, c.port))
            .collect();
        assert_eq!(hosts, expected_endpoints[round]);
        assert!(backends.iter().all(|c| c.routing_key == "db"));
    }
}

#[tokio::test]
async fn verifier_deleting_a_listener_closes_it_and_drops_the_finalizer() {
    let site = TestSite::start("dev").await;
    let port = free_port();
    site.admin()
        .post::<_, ListenerView>(
            "/v1/listeners",
            &admin::CreateListener {
                name: Some("web".into()),
                routing_key: "web".into(),
                port,
                bind: Some("0.0.0.0".into()),
                strategy: None,
            },
        )
        .await
        .unwrap();
    let (client, handle) = mock_client();
    let ctx = site.context(client);
    let mut listener = listener_object(port);
    listener.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
    let verifier = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let (patch, send, _) =
            expect(&mut handle, Method::PATCH, &format!("{LISTENERS}/web")).await;
        // A JSON patch that tests and removes exactly our finalizer.
        let ops = patch.as_array().unwrap();
        assert!(ops
            .iter()
            .any(|op| op["op"] == "remove" && op["path"] == "/metadata/finalizers/0"));
        assert!(ops
            .iter()
            .any(|op| op["op"] == "test" && op["value"] == FINALIZER));
        respond(
            send,
            &json!({"apiVersion": "skiff.dev/v1alpha1", "kind": "Listener",
            "metadata": {"name": "web"}, "spec": {"routingKey": "web", "port": port}}),
        );
    });
    reconcile::listener(Arc::new(listener), ctx).await.unwrap();
    verifier.await.unwrap();
    let listeners: Vec<ListenerView> = site.admin().get("/v1/listeners").await.unwrap();
    assert!(listeners.is_empty());
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
}

// ---------------------------------------------------------------------------------------
// Whole flows against the in-memory API server.

async fn get<K: serde::de::DeserializeOwned>(fake: &FakeApi, collection: &str, name: &str) -> K {
    serde_json::from_value(
        fake.get(collection, name)
            .unwrap_or_else(|| panic!("no {collection}/{name}")),
    )
    .unwrap()
}

/// Reconciles the Link `name` every 100 ms, for at most 10 s, until its status satisfies
/// `done`; that status, or `None` if it never did.
async fn reconcile_link_until(
    fake: &FakeApi,
    ctx: &Arc<Context>,
    name: &str,
    done: impl Fn(&LinkStatus) -> bool,
) -> Option<LinkStatus> {
    for _ in 0..100 {
        let link: Link = get(fake, LINKS, name).await;
        reconcile::link(Arc::new(link), ctx.clone()).await.unwrap();
        let link: Link = get(fake, LINKS, name).await;
        if let Some(status) = link.status.filter(|s| done(s)) {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test]
async fn fake_listener_lifecycle_is_idempotent_and_cleans_up() {
    let site = TestSite::start("dev").await;
    let fake = FakeApi::default();
    let ctx = site.context(fake.client(NS));
    let port = free_port();
    let mut listener = listener_object(port);
    listener.metadata.finalizers = None;
    listener.metadata.uid = None;
    fake.insert(LISTENERS, serde_json::to_value(&listener).unwrap());
    // First pass adds the finalizer; the watch would call again.
    let first: Listener = get(&fake, LISTENERS, "web").await;
    reconcile::listener(Arc::new(first), ctx.clone())
        .await
        .unwrap();
    let second: Listener = get(&fake, LISTENERS, "web").await;
    assert_eq!(second.finalizers(), [FINALIZER]);
    reconcile::listener(Arc::new(second), ctx.clone())
        .await
        .unwrap();
    let service = fake.get(SERVICES, "web").expect("the Service was created");
    assert_eq!(service["spec"]["ports"][0]["port"], port);
    let third: Listener = get(&fake, LISTENERS, "web").await;
    assert!(third.status.is_some());
    // Nothing changed: a second reconcile writes nothing.
    fake.take_requests();
    reconcile::listener(Arc::new(third.clone()), ctx.clone())
        .await
        .unwrap();
    let writes: Vec<String> = fake
        .take_requests()
        .into_iter()
        .filter(|r| !r.starts_with("GET"))
        .collect();
    assert_eq!(
        writes,
        [format!("PATCH {SERVICES}/web")],
        "only the (no-op) apply"
    );
    // A Service of the same name that is not ours is not taken over.
    let mut other = listener_object(free_port());
    other.metadata.name = Some("web2".into());
    other.metadata.uid = Some("uid-other".into());
    other.spec.host = Some("web".into());
    fake.insert(LISTENERS, serde_json::to_value(&other).unwrap());
    let other: Listener = get(&fake, LISTENERS, "web2").await;
    reconcile::listener(Arc::new(other), ctx.clone())
        .await
        .unwrap();
    let other: Listener = get(&fake, LISTENERS, "web2").await;
    let error = &other.status.unwrap().conditions[1];
    assert_eq!(
        (error.type_.as_str(), error.status.as_str()),
        ("Error", "True")
    );
    assert!(
        error.message.contains("not managed by skiff"),
        "{}",
        error.message
    );
    // Delete: the finalizer keeps it until the router's listener is gone, then the Service
    // goes with it.
    let client = fake.client(NS);
    let api: kube::Api<Listener> = kube::Api::namespaced(client, NS);
    api.delete("web", &Default::default()).await.unwrap();
    let deleting: Listener = get(&fake, LISTENERS, "web").await;
    assert!(deleting.metadata.deletion_timestamp.is_some());
    reconcile::listener(Arc::new(deleting), ctx.clone())
        .await
        .unwrap();
    assert!(fake.get(LISTENERS, "web").is_none());
    assert!(
        fake.get(SERVICES, "web").is_none(),
        "garbage-collected with its owner"
    );
    let left: Vec<ListenerView> = site.admin().get("/v1/listeners").await.unwrap();
    assert_eq!(
        left.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        ["web2"]
    );
}

#[tokio::test]
async fn fake_grant_token_and_link_across_two_clusters() {
    // Two shards each, so that the link adds a lane for the second and the status shows it.
    let stg = TestSite::start_sharded("stg", 2).await;
    let dev = TestSite::start_sharded("dev", 2).await;
    let (stg_api, dev_api) = (FakeApi::default(), FakeApi::default());
    let (stg_ctx, dev_ctx) = (
        stg.context(stg_api.client(NS)),
        dev.context(dev_api.client(NS)),
    );
    // stg: an AccessGrant becomes a token in a Secret.
    stg_api.insert(
        GRANTS,
        json!({"apiVersion": "skiff.dev/v1alpha1", "kind": "AccessGrant",
            "metadata": {"name": "for-dev", "namespace": NS}, "spec": {"uses": 1, "expiry": "10m"}}),
    );
    for _ in 0..2 {
        let grant: AccessGrant = get(&stg_api, GRANTS, "for-dev").await;
        reconcile::grant(Arc::new(grant), stg_ctx.clone())
            .await
            .unwrap();
    }
    let grant: AccessGrant = get(&stg_api, GRANTS, "for-dev").await;
    let status = grant.status.clone().unwrap();
    assert_eq!(status.token_secret.as_deref(), Some("for-dev-token"));
    assert_eq!(status.uses_left, Some(1));
    let status_text = serde_json::to_string(&status).unwrap();
    let secret = stg_api.get(SECRETS, "for-dev-token").unwrap();
    let bytes: k8s_openapi::ByteString =
        serde_json::from_value(secret["data"][resources::TOKEN_KEY].clone()).unwrap();
    let token_yaml = String::from_utf8(bytes.0).unwrap();
    let code = crate::token::AccessToken::parse(&token_yaml)
        .unwrap()
        .spec
        .code
        .0;
    assert!(
        !status_text.contains(&code),
        "the token never goes into the status"
    );
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["kind"],
        "AccessGrant"
    );
    // Reconciling again issues no second token.
    reconcile::grant(Arc::new(grant), stg_ctx.clone())
        .await
        .unwrap();
    let grants: Vec<admin::GrantView> = stg.admin().get("/v1/grants").await.unwrap();
    assert_eq!(grants.len(), 1);

    // dev: the token file, applied as is, becomes a Link that comes up.
    // Its name is the grant's id, and so is the Link's.
    let mut token: AccessTokenResource = serde_yaml_ng::from_str(&token_yaml).unwrap();
    let name = token.name_any();
    assert!(name.starts_with("stg-"), "{name}");
    token.metadata.namespace = Some(NS.into());
    dev_api.insert(TOKENS, serde_json::to_value(&token).unwrap());
    let token: AccessTokenResource = get(&dev_api, TOKENS, &name).await;
    reconcile::token(Arc::new(token), dev_ctx.clone())
        .await
        .unwrap();
    let token: AccessTokenResource = get(&dev_api, TOKENS, &name).await;
    assert_eq!(
        token.status.as_ref().unwrap().link.as_deref(),
        Some(name.as_str()),
        "{:?}",
        token.status
    );
    let link: Link = get(&dev_api, LINKS, &name).await;
    assert_eq!(link.spec.peer_site, "stg");
    assert_eq!(link.owner_references()[0].kind, "AccessToken");
    // Reconciling the token again redeems nothing (the token had one use).
    reconcile::token(Arc::new(token), dev_ctx.clone())
        .await
        .unwrap();
    let up = reconcile_link_until(&dev_api, &dev_ctx, &name, |s| {
        s.state.as_deref() == Some("up")
    })
    .await;
    assert!(up.is_some(), "the link came up and its status says so");
    // The status shows what the router reports: the transport and the lanes beside it. The
    // lane for the second shard comes up after the link; the status follows on a reconcile.
    let status = reconcile_link_until(&dev_api, &dev_ctx, &name, |s| s.lanes == Some(1))
        .await
        .expect("the link's lane for the second shard shows in its status");
    let links: Vec<LinkView> = dev.admin().get("/v1/links").await.unwrap();
    let view = links.iter().find(|l| l.name == name).unwrap();
    assert_eq!(status.transport.as_deref(), Some("tls"), "{status:?}");
    assert_eq!(
        (status.transport, status.lanes),
        (view.transport.clone(), view.lanes)
    );
    let grant: AccessGrant = get(&stg_api, GRANTS, "for-dev").await;
    reconcile::grant(Arc::new(grant), stg_ctx.clone())
        .await
        .unwrap();
    let grant: AccessGrant = get(&stg_api, GRANTS, "for-dev").await;
    let ready = &grant.status.unwrap().conditions[0];
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Spent")
    );

    // Deleting the AccessToken deletes its Link, whose finalizer removes the router's link.
    let api: kube::Api<AccessTokenResource> = kube::Api::namespaced(dev_api.client(NS), NS);
    api.delete(&name, &Default::default()).await.unwrap();
    let link: Link = get(&dev_api, LINKS, &name).await;
    assert!(link.metadata.deletion_timestamp.is_some());
    reconcile::link(Arc::new(link), dev_ctx.clone())
        .await
        .unwrap();
    assert!(dev_api.get(LINKS, &name).is_none());
    let links: Vec<LinkView> = dev.admin().get("/v1/links").await.unwrap();
    assert!(links.iter().all(|l| l.name != name), "{links:?}");

    // Deleting the grant withdraws its token from the site.
    let api: kube::Api<AccessGrant> = kube::Api::namespaced(stg_api.client(NS), NS);
    api.delete("for-dev", &Default::default()).await.unwrap();
    let grant: AccessGrant = get(&stg_api, GRANTS, "for-dev").await;
    reconcile::grant(Arc::new(grant), stg_ctx.clone())
        .await
        .unwrap();
    assert!(stg_api.get(GRANTS, "for-dev").is_none());
    assert!(stg_api.get(SECRETS, "for-dev-token").is_none());
    let grants: Vec<admin::GrantView> = stg.admin().get("/v1/grants").await.unwrap();
    assert!(grants.is_empty());
}

#[tokio::test]
async fn fake_bad_resources_get_an_error_status_not_a_crash() {
    let site = TestSite::start("dev").await;
    let fake = FakeApi::default();
    let ctx = site.context(fake.client(NS));
    // A connector with neither selector nor host.
    let mut connector = connector_object();
    connector.spec.selector = None;
    fake.insert(CONNECTORS, serde_json::to_value(&connector).unwrap());
    let connector: Connector = get(&fake, CONNECTORS, "db").await;
    reconcile::connector(Arc::new(connector), ctx.clone())
        .await
        .unwrap();
    let connector: Connector = get(&fake, CONNECTORS, "db").await;
    let conditions = connector.status.unwrap().conditions;
    assert_eq!(conditions[1].status, "True");
    assert!(conditions[1].message.contains("spec.selector"));
    // A token that is garbage (bad code, unreachable endpoint): an error status, retried later.
    fake.insert(
        TOKENS,
        json!({"apiVersion": "skiff.dev/v1alpha1", "kind": "AccessToken",
            "metadata": {"name": "bogus", "namespace": NS},
            "spec": {"endpoints": ["127.0.0.1:1"], "code": "00", "ca": "not a certificate",
                "cost": 1, "expires": "2099-01-01T00:00:00Z",
                "issuer": {"name": "stg", "id": "00000000-0000-0000-0000-000000000001"}}}),
    );
    let token: AccessTokenResource = get(&fake, TOKENS, "bogus").await;
    let action = reconcile::token(Arc::new(token), ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        action,
        Action::await_change(),
        "a malformed token is not retried"
    );
    let token: AccessTokenResource = get(&fake, TOKENS, "bogus").await;
    let status = token.status.unwrap();
    assert_eq!(status.conditions[1].status, "True");
    assert!(fake.get(LINKS, "bogus").is_none());
    // A site nobody can reach issues no token, and says why.
    ctx.reachable
        .store(false, std::sync::atomic::Ordering::Relaxed);
    fake.insert(
        GRANTS,
        json!({"apiVersion": "skiff.dev/v1alpha1", "kind": "AccessGrant",
            "metadata": {"name": "nowhere", "namespace": NS, "finalizers": [FINALIZER]},
            "spec": {}}),
    );
    let grant: AccessGrant = get(&fake, GRANTS, "nowhere").await;
    reconcile::grant(Arc::new(grant), ctx.clone())
        .await
        .unwrap();
    let grant: AccessGrant = get(&fake, GRANTS, "nowhere").await;
    assert!(grant.status.unwrap().conditions[1]
        .message
        .contains("linkAccess"));
    ctx.reachable
        .store(true, std::sync::atomic::Ordering::Relaxed);
    // A grant with an unreadable expiry.
    fake.insert(
        GRANTS,
        json!({"apiVersion": "skiff.dev/v1alpha1", "kind": "AccessGrant",
            "metadata": {"name": "g", "namespace": NS, "finalizers": [FINALIZER]},
            "spec": {"expiry": "soon"}}),
    );
    let grant: AccessGrant = get(&fake, GRANTS, "g").await;
    reconcile::grant(Arc::new(grant), ctx.clone())
        .await
        .unwrap();
    let grant: AccessGrant = get(&fake, GRANTS, "g").await;
    assert!(grant.status.unwrap().conditions[1]
        .message
        .contains("spec.expiry"));
    assert!(fake.names(SECRETS).is_empty(), "no token issued");
}

#[tokio::test]
async fn fake_site_identity_lives_in_its_secret_and_follows_the_load_balancer() {
    let fake = FakeApi::default();
    let client = fake.client(NS);
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context {
        client: client.clone(),
        namespace: NS.into(),
        site: admin::Client::new(dir.path()),
        router_selector: BTreeMap::from([("app.kubernetes.io/name".into(), "skiff".into())]),
        reachable: true.into(),
    };
    const SITES: &str = "/apis/skiff.dev/v1alpha1/namespaces/skiff/sites";
    fake.insert(
        SITES,
        json!({"apiVersion": "skiff.dev/v1alpha1", "kind": "Site",
            "metadata": {"name": "prod", "namespace": NS},
            "spec": {"linkAccess": "LoadBalancer", "linkHosts": ["prod.example.com"]}}),
    );
    let site: crate::crd::Site = get(&fake, SITES, "prod").await;
    let settings = super::settings_of(&ctx, &site, true).await.unwrap();
    let service = fake
        .get(SERVICES, resources::LINK_SERVICE)
        .expect("link Service");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert_eq!(service["metadata"]["ownerReferences"][0]["kind"], "Site");
    assert!(settings.access.pending.is_some(), "no address yet");
    // The cloud gives the load balancer an address: the settings change (the router restarts
    // with it in its certificate and tokens).
    let mut with_ip = service.clone();
    with_ip["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}});
    fake.insert(SERVICES, with_ip);
    fake.take_requests();
    let later = super::settings_of(&ctx, &site, false).await.unwrap();
    assert!(
        fake.take_requests().iter().all(|r| r.starts_with("GET")),
        "an unchanged Site's Service is only read"
    );
    assert_ne!(later, settings);
    assert_eq!(later.access.pending, None);
    assert!(later.access.hosts.contains(&"203.0.113.9".to_string()));

    // A new site is created and saved in the Secret at once.
    let store = crate::Store::new(dir.path().join("a"));
    super::prepare_store(&ctx, &store, &later).await.unwrap();
    let config = store.load_config().unwrap();
    assert_eq!(config.name, "prod");
    assert_eq!(config.link_hosts[..2], ["prod.example.com", "203.0.113.9"]);
    assert!(fake.get(SECRETS, super::state::STATE_SECRET).is_some());
    // A new pod (an empty state dir) gets the same identity back.
    let again = crate::Store::new(dir.path().join("b"));
    super::prepare_store(&ctx, &again, &later).await.unwrap();
    assert_eq!(again.load_config().unwrap().id, config.id);
    assert_eq!(
        again.read("ca.key").unwrap(),
        store.read("ca.key").unwrap(),
        "the CA key came back from the Secret"
    );
    // A Site renamed over an existing identity is refused with what to do.
    let mut renamed = later.clone();
    renamed.name = "other".into();
    let third = crate::Store::new(dir.path().join("c"));
    let error = super::prepare_store(&ctx, &third, &renamed)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("delete that Secret"), "{error}");
}

/// Polls `check` every 100 ms for up to 20 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn condition(object: &Option<Value>, type_: &str) -> Option<String> {
    object.as_ref()?["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_controller_runs_a_site_from_its_resources() {
    const SITES: &str = "/apis/skiff.dev/v1alpha1/namespaces/skiff/sites";
    let fake = FakeApi::default();
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let options = super::Options {
        namespace: Some(NS.into()),
        state_dir: dir.path().join("state"),
        metrics_addr: Some(([127, 0, 0, 1], metrics_port).into()),
        router_selector: BTreeMap::from([("app".into(), "skiff".into())]),
        run: crate::site::RunOptions {
            access_log: false,
            ..Default::default()
        },
    };
    let shutdown = CancellationToken::new();
    let controller = tokio::spawn(super::run(fake.client(NS), options, shutdown.clone()));
    let readyz = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).ok()?;
        use std::io::{Read, Write};
        s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        Some(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"))
    };
    // Alive but not ready while there is no Site.
    eventually("/readyz answers", || readyz().is_some()).await;
    assert_eq!(readyz(), Some(false));
    let link_port = free_port();
    fake.insert(
        SITES,
        json!({"apiVersion": "skiff.dev/v1alpha1", "kind": "Site",
            "metadata": {"name": "dev", "namespace": NS},
            "spec": {"linkAccess": "ClusterIP", "linkPort": link_port, "quic": false}}),
    );
    eventually("the Site is Ready", || {
        condition(&fake.get(SITES, "dev"), "Ready").as_deref() == Some("True")
    })
    .await;
    assert_eq!(readyz(), Some(true));
    let site = fake.get(SITES, "dev").unwrap();
    assert_eq!(
        site["status"]["endpoints"][0],
        format!("skiff-link.skiff.svc.cluster.local:{link_port}")
    );
    assert!(fake.get(SERVICES, resources::LINK_SERVICE).is_some());
    assert!(fake.get(SECRETS, super::state::STATE_SECRET).is_some());

    // A Connector and a Listener for the same key: the listener's port carries bytes to the
    // backend through the site itself.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_port = backend.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = backend.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    fake.insert(
        CONNECTORS,
        json!({"apiVersion": "skiff.dev/v1alpha1", "kind": "Connector",
            "metadata": {"name": "echo", "namespace": NS},
            "spec": {"routingKey": "echo", "host": "127.0.0.1", "port": backend_port}}),
    );
    let port = free_port();
    fake.insert(
        LISTENERS,
        json!({"apiVersion": "skiff.dev/v1alpha1", "kind": "Listener",
            "metadata": {"name": "echo", "namespace": NS},
            "spec": {"routingKey": "echo", "port": port}}),
    );
    eventually("the Listener is Ready", || {
        condition(&fake.get(LISTENERS, "echo"), "Ready").as_deref() == Some("True")
    })
    .await;
    assert!(fake.get(SERVICES, "echo").is_some());
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    client.write_all(b"through the controller").await.unwrap();
    let mut answer = [0u8; 22];
    client.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"through the controller");

    // Deleting the Listener closes its port.
    let api: kube::Api<Listener> = kube::Api::namespaced(fake.client(NS), NS);
    api.delete("echo", &Default::default()).await.unwrap();
    eventually("the Listener is gone", || {
        fake.get(LISTENERS, "echo").is_none()
    })
    .await;
    assert!(fake.get(SERVICES, "echo").is_none());
    eventually("the port is closed", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    })
    .await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), controller)
        .await
        .expect("the controller stops when told")
        .unwrap()
        .unwrap();
}
