//! Credential providers for signing: access keys loaded on demand (from a Kubernetes Secret or a
//! file), and Cognito identities (GetId + GetCredentialsForIdentity), like Amplify.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use aws_credential_types::Credentials;
use aws_credential_types::provider::{self, ProvideCredentials, error::CredentialsError};
use tokio::sync::Mutex;

use crate::relay::config::Secret;

/// Access keys as stored.
pub struct AccessKeys {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

/// Keys, or why they could not be read (kept as the credentials error's source).
pub type KeysFuture =
    Pin<Box<dyn Future<Output = Result<AccessKeys, crate::error::Source>> + Send>>;
/// Loads the keys anew on every call, so a rotated Secret is used at the next connection.
pub type KeyLoader = Arc<dyn Fn() -> KeysFuture + Send + Sync>;

/// Credentials from a loader.
#[derive(Clone)]
pub struct LoadedKeys {
    loader: KeyLoader,
}

impl LoadedKeys {
    pub fn new(loader: KeyLoader) -> Self {
        Self { loader }
    }
}

impl fmt::Debug for LoadedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LoadedKeys")
    }
}

impl ProvideCredentials for LoadedKeys {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(async move {
            let keys = (self.loader)()
                .await
                .map_err(CredentialsError::not_loaded)?;
            Ok(Credentials::new(
                keys.access_key_id,
                keys.secret_access_key.expose(),
                keys.session_token.map(|t| t.expose().to_owned()),
                None,
                "iot-operator-keys",
            ))
        })
    }
}

/// Temporary credentials of a Cognito identity (unauthenticated, or a given identity id).
pub struct CognitoIdentity {
    client: aws_sdk_cognitoidentity::Client,
    pool_id: String,
    identity_id: Mutex<Option<String>>,
}

impl fmt::Debug for CognitoIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CognitoIdentity")
            .field("pool_id", &self.pool_id)
            .finish_non_exhaustive()
    }
}

impl CognitoIdentity {
    pub fn new(
        client: aws_sdk_cognitoidentity::Client,
        pool_id: String,
        identity_id: Option<String>,
    ) -> Self {
        Self {
            client,
            pool_id,
            identity_id: Mutex::new(identity_id),
        }
    }

    /// The identity id, obtained with GetId on first use and kept.
    pub async fn identity_id(&self) -> Result<String, CredentialsError> {
        let mut id = self.identity_id.lock().await;
        if let Some(id) = id.as_ref() {
            return Ok(id.clone());
        }
        let out = self
            .client
            .get_id()
            .identity_pool_id(&self.pool_id)
            .send()
            .await
            .map_err(|e| {
                CredentialsError::provider_error(CognitoCallFailed {
                    call: "GetId for pool",
                    subject: self.pool_id.clone(),
                    source: crate::error::Source::new(e),
                })
            })?;
        let new = out
            .identity_id()
            .ok_or_else(|| {
                CredentialsError::provider_error("Cognito GetId returned no identity id")
            })?
            .to_owned();
        *id = Some(new.clone());
        Ok(new)
    }
}

/// A Cognito call for credentials failed; the text has the SDK error's whole chain (its top
/// line alone, "service error", says little).
#[derive(Debug, thiserror::Error)]
#[error("Cognito {call} {subject} failed: {}", crate::error::chain(.source))]
struct CognitoCallFailed {
    call: &'static str,
    subject: String,
    #[source]
    source: crate::error::Source,
}

impl ProvideCredentials for CognitoIdentity {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(async move {
            let identity = self.identity_id().await?;
            let out = self
                .client
                .get_credentials_for_identity()
                .identity_id(&identity)
                .send()
                .await
                .map_err(|e| {
                    CredentialsError::provider_error(CognitoCallFailed {
                        call: "GetCredentialsForIdentity for",
                        subject: identity.clone(),
                        source: crate::error::Source::new(e),
                    })
                })?;
            let c = out.credentials().ok_or_else(|| {
                CredentialsError::provider_error("Cognito returned no credentials")
            })?;
            let expiry = c
                .expiration()
                .and_then(|t| std::time::SystemTime::try_from(*t).ok());
            Ok(Credentials::new(
                c.access_key_id().unwrap_or_default(),
                c.secret_key().unwrap_or_default(),
                c.session_token().map(str::to_owned),
                expiry,
                "iot-operator-cognito",
            ))
        })
    }
}
