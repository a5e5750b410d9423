"""The chart's proxy settings for server-sent event streams: the Ingress turns ingress-nginx's response buffering off
and its timeouts, like the HTTPRoute's, follow the gateway's longest deadline plus a margin, so a proxy neither
holds tokens back nor cuts a stream the gateway still allows; the user's own settings win, and one shorter than the
deadline is refused at render time."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml

from conftest import CHART, HELMS, KUBERNETES, by_kind, helm, render

NGINX = "nginx.ingress.kubernetes.io/"
BOTH = ["--set", "gateway.ingress.enabled=true,gateway.httpRoute.enabled=true"]
DURATION = r"([0-9]{1,5}(h|m|s|ms)){1,4}"  # the Gateway API's Duration


def proxies(version: str = "helm3", values: list[str] | None = None) -> tuple[dict, dict]:
    objects = render(version, [*BOTH, *(values or [])])
    return by_kind(objects, "Ingress")[0], by_kind(objects, "HTTPRoute")[0]


def longer_deadline(tmp_path, deadline: float, margin: int) -> list[str]:
    """Values for a longer deadline (the graces must cover it), as a file: --set would make 120.5 a string."""
    grace = {"graceSeconds": int(deadline) + 5, "terminationGracePeriodSeconds": int(deadline) + 30}
    values = {
        "gateway": {"maxDeadlineSeconds": deadline, "proxyTimeoutMarginSeconds": margin, **grace},
        "inference": grace,
    }
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["-f", str(path)]


@pytest.mark.parametrize("version", HELMS)
def test_streams_pass_unbuffered_and_uncut_by_default(version):
    ingress, route = proxies(version)
    assert ingress["metadata"]["annotations"] == {
        NGINX + "proxy-buffering": "off",
        NGINX + "proxy-read-timeout": "40",  # maxDeadlineSeconds 30 + the 10 s margin
        NGINX + "proxy-send-timeout": "40",
    }
    (rule,) = route["spec"]["rules"]
    assert rule["timeouts"] == {"request": "40s", "backendRequest": "40s"}
    assert all(re.fullmatch(DURATION, value) for value in rule["timeouts"].values())
    for kubernetes in KUBERNETES:
        kubernetes_validate.validate(ingress, kubernetes, strict=True)


def test_the_timeouts_follow_the_deadline_and_the_margin(tmp_path):
    ingress, route = proxies(values=longer_deadline(tmp_path, 120.5, 5))
    annotations = ingress["metadata"]["annotations"]
    assert annotations[NGINX + "proxy-read-timeout"] == annotations[NGINX + "proxy-send-timeout"] == "126"
    assert route["spec"]["rules"][0]["timeouts"] == {"request": "126s", "backendRequest": "126s"}
    ingress, route = proxies(values=longer_deadline(tmp_path, 3600, 0))
    assert ingress["metadata"]["annotations"][NGINX + "proxy-read-timeout"] == "3600"
    assert route["spec"]["rules"][0]["timeouts"]["request"] == "3600s"


def test_the_users_settings_win_and_each_part_can_be_turned_off():
    ingress, route = proxies(
        values=[
            "--set-json",
            f'gateway.ingress.annotations={{"{NGINX}proxy-send-timeout": "600", "example.com/team": "ml"}}',
            "--set",
            "gateway.httpRoute.timeouts.request=5m",
        ]
    )
    assert ingress["metadata"]["annotations"] == {
        NGINX + "proxy-buffering": "off",
        NGINX + "proxy-read-timeout": "40",
        NGINX + "proxy-send-timeout": "600",
        "example.com/team": "ml",
    }
    assert route["spec"]["rules"][0]["timeouts"] == {"request": "5m"}  # replaced whole: backendRequest <= request
    ingress, route = proxies(
        values=["--set", "gateway.ingress.nginxStreaming=false,gateway.httpRoute.streamTimeouts=false"]
    )
    assert "annotations" not in ingress["metadata"]
    assert "timeouts" not in route["spec"]["rules"][0]


@pytest.mark.parametrize("key", ["proxy-read-timeout", "proxy-send-timeout"])
def test_a_proxy_timeout_shorter_than_the_deadline_is_refused(key):
    values = [
        "--set",
        "gateway.ingress.enabled=true",
        "--set-json",
        f'gateway.ingress.annotations={{"{NGINX}{key}": "20"}}',
    ]
    done = helm("helm3", "template", "inferencehub", str(CHART), *values, check=False)
    assert done.returncode != 0
    assert f"{NGINX}{key} (20 s) is shorter than gateway.maxDeadlineSeconds (30 s)" in done.stderr
