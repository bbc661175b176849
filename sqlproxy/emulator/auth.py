"""Offline credentials: access tokens, a service account key, an authorized-user file."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

import google.auth.exceptions
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import jwt

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
SQLSERVICE_ADMIN = "https://www.googleapis.com/auth/sqlservice.admin"
SQLSERVICE = "https://www.googleapis.com/auth/sqlservice"
SQLSERVICE_LOGIN = "https://www.googleapis.com/auth/sqlservice.login"
# A GCE VM created with the "default access" scopes: no Cloud SQL access.
GCE_DEFAULT_SCOPES = (
    "https://www.googleapis.com/auth/devstorage.read_only",
    "https://www.googleapis.com/auth/logging.write",
    "https://www.googleapis.com/auth/monitoring.write",
    "https://www.googleapis.com/auth/service.management.readonly",
    "https://www.googleapis.com/auth/servicecontrol",
    "https://www.googleapis.com/auth/trace.append",
)
DEFAULT_TOKEN_TTL = 3600
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """TokenInfo is what the emulator knows about an access token it issued."""

    email: str
    scopes: frozenset[str]
    expires: float

    @property
    def valid(self) -> bool:
        """valid is true until the token expires."""
        return time.time() < self.expires


class AuthError(Exception):
    """AuthError is an OAuth error answer: an error code and a description."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


@dataclass
class ServiceAccount:
    """ServiceAccount is an emulated service account with an RSA key for JWT assertions."""

    email: str
    project: str
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    key_id: str = field(default_factory=lambda: secrets.token_hex(20))

    @property
    def iam_user(self) -> str:
        """iam_user is the PostgreSQL user name for IAM login (email without the suffix)."""
        return self.email.removesuffix(".gserviceaccount.com")

    def public_pem(self) -> str:
        """public_pem is the key's public half as PEM."""
        return (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def key_file(self, token_uri: str) -> str:
        """key_file is a service account JSON key whose token_uri points at the emulator."""
        private = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return json.dumps(
            {
                "type": "service_account",
                "project_id": self.project,
                "private_key_id": self.key_id,
                "private_key": private,
                "client_email": self.email,
                "client_id": str(secrets.randbelow(10**20)),
                "auth_uri": token_uri.rsplit("/", 1)[0] + "/auth",
                "token_uri": token_uri,
                "universe_domain": "googleapis.com",
            },
            indent=2,
        )


class TokenStore:
    """TokenStore issues and checks the emulator's access tokens."""

    def __init__(self) -> None:
        self._tokens: dict[str, TokenInfo] = {}
        self.accounts: dict[str, ServiceAccount] = {}
        self._refresh_tokens: dict[str, tuple[str, str]] = {}

    def mint(
        self,
        email: str,
        scopes: frozenset[str] | set[str] | tuple[str, ...],
        ttl: float = DEFAULT_TOKEN_TTL,
    ) -> tuple[str, TokenInfo]:
        """mint issues a new access token for email with the given scopes."""
        token = "ya29.emu-" + secrets.token_urlsafe(32)
        info = TokenInfo(email=email, scopes=frozenset(scopes), expires=time.time() + ttl)
        self._tokens[token] = info
        return token, info

    def lookup(self, token: str) -> TokenInfo | None:
        """lookup returns a token's info if the emulator issued it (expired or not)."""
        return self._tokens.get(token)

    def add_account(self, account: ServiceAccount) -> None:
        """add_account registers a service account whose key may sign assertions."""
        self.accounts[account.email] = account

    def authorized_user_file(self, email: str, token_uri: str) -> str:
        """authorized_user_file is a gcloud-style ADC file for a user, refreshable here."""
        client_id = secrets.token_hex(8) + ".apps.googleusercontent.com"
        client_secret = secrets.token_urlsafe(18)
        refresh = "1//emu-" + secrets.token_urlsafe(32)
        self._refresh_tokens[refresh] = (email, client_id)
        return json.dumps(
            {
                "type": "authorized_user",
                "client_id": client_id,
                "client_secret": client_secret,
                "refresh_token": refresh,
                "token_uri": token_uri,
                "account": email,
                "universe_domain": "googleapis.com",
            },
            indent=2,
        )

    def grant(self, form: dict[str, str], token_uri: str, ttl: float) -> tuple[str, TokenInfo]:
        """grant answers an OAuth token request (JWT bearer or refresh token)."""
        grant_type = form.get("grant_type", "")
        if grant_type == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self._grant_jwt(form.get("assertion", ""), token_uri, ttl)
        if grant_type == "refresh_token":
            user = self._refresh_tokens.get(form.get("refresh_token", ""))
            if user is None or user[1] != form.get("client_id"):
                raise AuthError("invalid_grant", "Bad Request")
            scopes = set(form.get("scope", "").split()) or {CLOUD_PLATFORM}
            return self.mint(user[0], scopes, ttl)
        raise AuthError("unsupported_grant_type", f"Invalid grant_type: {grant_type}")

    def _grant_jwt(self, assertion: str, token_uri: str, ttl: float) -> tuple[str, TokenInfo]:
        try:
            unverified = jwt.decode(assertion, verify=False)  # type: ignore[no-untyped-call]
        except (ValueError, google.auth.exceptions.GoogleAuthError):
            raise AuthError("invalid_grant", "Invalid JWT: malformed assertion") from None
        account = self.accounts.get(str(unverified.get("iss", "")))
        if account is None:
            raise AuthError("invalid_grant", "Invalid JWT Signature.")
        try:
            # google-auth always names Google's endpoint as the audience, whatever token_uri is.
            claims = jwt.decode(  # type: ignore[no-untyped-call]
                assertion, certs=account.public_pem(), audience=[token_uri, GOOGLE_TOKEN_URI]
            )
        except (ValueError, google.auth.exceptions.GoogleAuthError):
            raise AuthError("invalid_grant", "Invalid JWT Signature.") from None
        scopes = set(str(claims.get("scope", "")).split())
        if not scopes:
            raise AuthError("invalid_scope", "Empty or missing scope not allowed.")
        return self.mint(account.email, scopes, ttl)
