//! The built-in development identity provider: serves OIDC discovery and a
//! JWKS on loopback and mints Entra-shaped tokens. Never for production; the
//! daemon accepts its issuer only when the config says so.
