//! Checks at start, before any controller runs: the API server answers, the operator's
//! credentials are accepted, both CRDs are installed and the operator may list its kinds where it
//! watches them. Each failure says what to fix, instead of a watch that retries forever.

use std::time::Duration;

use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use kube::{Api, Client, Resource};

use crate::api::{IotPolicyBinding, TopicBridge};

/// How long each check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the operator cannot start against this API server.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("the Kubernetes API server at {url} cannot be reached: {}", chain(.source))]
    Unreachable {
        url: String,
        #[source]
        source: kube::Error,
    },
    #[error("the Kubernetes API server at {url} did not answer within {} s", CHECK_TIMEOUT.as_secs())]
    Timeout { url: String },
    #[error(
        "the Kubernetes API server at {url} rejected the operator's credentials (401): check \
         the kubeconfig user or the pod's service account token"
    )]
    Unauthorized { url: String },
    #[error(
        "the CustomResourceDefinition {crd} is not installed: kubectl apply -f crds/ (the Helm \
         chart installs it too)"
    )]
    CrdMissing { crd: String },
    #[error(
        "the operator may not list {resource} {scope}: {message}. Give its service account the \
         chart's RBAC (a ClusterRole, or a Role in the watched namespace)"
    )]
    Forbidden {
        resource: String,
        scope: String,
        message: String,
    },
    #[error("listing {resource} {scope} failed: {}", chain(.source))]
    Other {
        resource: String,
        scope: String,
        #[source]
        source: kube::Error,
    },
}

use crate::error::chain;
use k8s_openapi::api::core::v1::ConfigMap;

/// Runs the checks in order and returns the first failure. `url` names the API server in
/// messages; `namespace` is the watched namespace (`None`: all); `records` is the namespace of
/// the bindings' records (ConfigMaps).
pub async fn check(
    client: &Client,
    url: &str,
    namespace: Option<&str>,
    records: &str,
    controllers: super::Controllers,
) -> Result<(), PreflightError> {
    let url = url.to_owned();
    match tokio::time::timeout(CHECK_TIMEOUT, client.apiserver_version()).await {
        Err(_) => return Err(PreflightError::Timeout { url }),
        Ok(Err(kube::Error::Api(s))) if s.code == 401 => {
            return Err(PreflightError::Unauthorized { url });
        }
        // /version is readable by anyone authenticated, and by anonymous users where allowed;
        // other answers (403 with anonymous access off, say) are judged by the listings below.
        Ok(Err(kube::Error::Api(_))) | Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(PreflightError::Unreachable { url, source: e });
        }
    }
    if controllers.policy {
        can_list::<IotPolicyBinding>(client, &url, namespace).await?;
        can_list::<ConfigMap>(client, &url, Some(records)).await?;
    }
    if controllers.bridge {
        can_list::<TopicBridge>(client, &url, namespace).await?;
    }
    Ok(())
}

/// With bridges spread over replicas: the operator may list the Leases of its namespace.
pub async fn check_sharding(
    client: &Client,
    url: &str,
    lease_namespace: &str,
) -> Result<(), PreflightError> {
    can_list::<k8s_openapi::api::coordination::v1::Lease>(client, url, Some(lease_namespace)).await
}

async fn can_list<K>(
    client: &Client,
    url: &str,
    namespace: Option<&str>,
) -> Result<(), PreflightError>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let resource = match K::group(&()).as_ref() {
        "" => K::plural(&()).into_owned(),
        group => format!("{}.{group}", K::plural(&())),
    };
    let (api, scope): (Api<PartialObjectMeta<K>>, String) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            format!("in namespace {ns}"),
        ),
        None => (Api::all(client.clone()), "in all namespaces".to_owned()),
    };
    let params = ListParams::default().limit(1);
    match tokio::time::timeout(CHECK_TIMEOUT, api.list_metadata(&params)).await {
        Err(_) => Err(PreflightError::Timeout {
            url: url.to_owned(),
        }),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(kube::Error::Api(s))) if s.code == 404 => {
            Err(PreflightError::CrdMissing { crd: resource })
        }
        Ok(Err(kube::Error::Api(s))) if s.code == 401 => Err(PreflightError::Unauthorized {
            url: url.to_owned(),
        }),
        Ok(Err(kube::Error::Api(s))) if s.code == 403 => Err(PreflightError::Forbidden {
            resource,
            scope,
            message: s.message,
        }),
        Ok(Err(e)) => Err(PreflightError::Other {
            resource,
            scope,
            source: e,
        }),
    }
}
