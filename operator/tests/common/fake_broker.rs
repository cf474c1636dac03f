//! An in-process broker admin API for the reconciler tests: records every call and
//! answers as configured.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use eventtermq_proto::v1 as pb;
use eventtermq_proto::v1::admin_server::{Admin, AdminServer};
use tonic::{Request, Response, Status};

/// What the fake answers; `None` means success.
#[derive(Default)]
pub struct Script {
    pub create_topic: Option<Status>,
    pub update_topic: Option<Status>,
    pub delete: Option<Status>,
    pub create_consumer_group: Option<Status>,
    pub dump: Option<pb::DumpResponse>,
    /// Raft index of successful writes.
    pub index: u64,
}

#[derive(Default)]
pub struct State {
    pub script: Mutex<Script>,
    pub calls: Mutex<Vec<String>>,
}

impl State {
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn write(&self, error: Option<Status>) -> Result<Response<pb::WriteResponse>, Status> {
        match error {
            Some(status) => Err(status),
            None => Ok(Response::new(pb::WriteResponse { ok: true, index: self.script.lock().unwrap().index })),
        }
    }
}

#[derive(Clone)]
pub struct FakeBroker(pub Arc<State>);

#[tonic::async_trait]
impl Admin for FakeBroker {
    async fn create_namespace(
        &self,
        r: Request<pb::CreateNamespaceRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.0.record(format!("CreateNamespace {}", r.get_ref().name));
        self.0.write(None)
    }

    async fn delete_namespace(
        &self,
        r: Request<pb::DeleteNamespaceRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.0.record(format!("DeleteNamespace {}", r.get_ref().name));
        self.0.write(None)
    }

    async fn list_namespaces(
        &self,
        _: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn create_topic(&self, r: Request<pb::CreateTopicRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        let topic = r.topic.unwrap_or_default();
        self.0.record(format!(
            "CreateTopic {}/{} shards={} rf={} retention={:?} type={}",
            r.namespace,
            topic.name,
            topic.shards,
            topic.replication_factor,
            topic.retention.map(|d| d.seconds),
            topic.default_exchange_type
        ));
        let error = self.0.script.lock().unwrap().create_topic.clone();
        self.0.write(error)
    }

    async fn update_topic(&self, r: Request<pb::UpdateTopicRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        self.0.record(format!("UpdateTopic {}/{} rf={:?}", r.namespace, r.name, r.replication_factor));
        let error = self.0.script.lock().unwrap().update_topic.clone();
        self.0.write(error)
    }

    async fn delete_topic(&self, r: Request<pb::DeleteTopicRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        self.0.record(format!("DeleteTopic {}/{}", r.namespace, r.name));
        let error = self.0.script.lock().unwrap().delete.clone();
        self.0.write(error)
    }

    async fn list_topics(&self, _: Request<pb::ListTopicsRequest>) -> Result<Response<pb::ListTopicsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn create_consumer_group(
        &self,
        r: Request<pb::CreateConsumerGroupRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        let group = r.consumer_group.unwrap_or_default();
        self.0.record(format!("CreateConsumerGroup {}/{} bindings={}", r.namespace, group.name, group.bindings.len()));
        let error = self.0.script.lock().unwrap().create_consumer_group.clone();
        self.0.write(error)
    }

    async fn delete_consumer_group(
        &self,
        r: Request<pb::DeleteConsumerGroupRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        self.0.record(format!("DeleteConsumerGroup {}/{}", r.namespace, r.name));
        let error = self.0.script.lock().unwrap().delete.clone();
        self.0.write(error)
    }

    async fn list_consumer_groups(
        &self,
        _: Request<pb::ListConsumerGroupsRequest>,
    ) -> Result<Response<pb::ListConsumerGroupsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn dump(&self, _: Request<pb::DumpRequest>) -> Result<Response<pb::DumpResponse>, Status> {
        self.0.record("Dump".to_string());
        match self.0.script.lock().unwrap().dump.clone() {
            Some(dump) => Ok(Response::new(dump)),
            None => Err(Status::unavailable("no leader")),
        }
    }
}

/// Starts the fake on 127.0.0.1:0; it runs until the test's runtime ends.
pub async fn start(script: Script) -> (SocketAddr, Arc<State>) {
    let state = Arc::new(State { script: Mutex::new(script), calls: Mutex::default() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service = AdminServer::new(FakeBroker(state.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (address, state)
}

/// A 127.0.0.1 address nothing listens on.
pub async fn closed_address() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
    // The listener drops here, so connections are refused.
}

/// A Dump of a healthy three-node cluster led by node 2.
pub fn healthy_dump() -> pb::DumpResponse {
    let node = |id: u64, pod: &str| pb::Node {
        id,
        address: format!("{pod}.emq-nodes.messaging.svc.cluster.local:16000"),
        state: pb::NodeState::Alive as i32,
        raft_role: "voter".into(),
    };
    pb::DumpResponse {
        state: Some(pb::ClusterState {
            index: 42,
            namespaces: vec![],
            nodes: vec![node(1, "emq-0"), node(2, "emq-1"), node(3, "emq-2")],
            segments: vec![],
        }),
        segments: vec![],
        node_id: 1,
        leader_id: 2,
        term: 3,
    }
}
