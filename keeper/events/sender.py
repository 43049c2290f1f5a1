"""One delivery attempt: ``POST`` the event's exact body to the webhook, signed.

Redirects are not followed (a 3xx is not a delivery), the answer's body is read to at most
:data:`MAX_ANSWER_BYTES`, and each attempt has the webhook's connect and read timeout. What
goes wrong is said by kind and status only: a ``requests`` error's text holds the url, whose
query string could hold a secret of the receiver's.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter

from keeper import __version__
from keeper.config.webhooks import WebhookConfig
from keeper.events.signing import sign

#: The most of an answer's body keeper reads (it only needs the status).
MAX_ANSWER_BYTES = 4096


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: a 2xx is delivery; ``status`` None when no answer came."""

    status: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Sender:
    """Sends to one webhook over one kept-alive connection (no proxy from the environment,
    no cookies, no retries of its own: the schedule is keeper's)."""

    def __init__(self, hook: WebhookConfig) -> None:
        self.hook = hook
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=1,
                                                  max_retries=0))
        self.session.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=1,
                                                   max_retries=0))

    def send(self, event_id: str, body: str, *, t: int) -> Outcome:
        """One attempt, signed for time ``t`` (Unix seconds: the attempt's own time)."""
        data = body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"keeper/{__version__}",
            "Keeper-Event-Id": event_id,
            "Keeper-Signature": sign(self.hook.require_secret(), data, t),
        }
        try:
            with self.session.post(self.hook.url, data=data, headers=headers,
                                   timeout=(self.hook.timeout_s, self.hook.timeout_s),
                                   allow_redirects=False, stream=True) as answer:
                # A little of the body, so a short answer leaves the connection reusable;
                # never more (a receiver could send without end).
                for _ in answer.iter_content(MAX_ANSWER_BYTES):
                    break
                status = answer.status_code
        except requests.exceptions.ConnectTimeout:
            return Outcome(None, "connect timeout")
        except requests.exceptions.ReadTimeout:
            return Outcome(None, "read timeout")
        except requests.exceptions.SSLError:
            return Outcome(None, "TLS error")
        except requests.exceptions.ConnectionError:
            return Outcome(None, "connection failed")
        except requests.exceptions.RequestException as e:
            return Outcome(None, type(e).__name__)
        return Outcome(status, None if 200 <= status < 300 else f"HTTP {status}")

    def close(self) -> None:
        self.session.close()
