"""The chart's zmachine-hub: off by default; when on, a Deployment running the hub from the
controller image on a PersistentVolumeClaim, a Service, and TokenReview rights or a token Secret."""

from __future__ import annotations

import pytest

from tests.charts.helm import VALUE_SETS, Helm, HelmError, find, one


def test_hub_is_off_by_default(helm: Helm) -> None:
    docs = helm.template()
    assert not [d for d in docs if d["metadata"]["name"].endswith("-hub")]
    assert not find(docs, "PersistentVolumeClaim")


def test_hub_with_token_review(helm: Helm) -> None:
    docs = helm.template(*VALUE_SETS["hub"])
    deploy = one(docs, "Deployment", "-hub")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["zmachine-hub"]
    assert container["image"].startswith("zmachine-operator/zmachine-controller:")
    assert "--token-review" in container["args"] and "--audience=zmachine-hub" in container["args"]
    assert (
        "--public-url=http://zm-zmachine-operator-hub.zmachine-system.svc:8080" in container["args"]
    )
    assert pod["serviceAccountName"] == deploy["metadata"]["name"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    claim = one(docs, "PersistentVolumeClaim", "-hub")
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    service = one(docs, "Service", "-hub")
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    binding = one(docs, "ClusterRoleBinding", "-hub-auth-delegator")
    assert binding["roleRef"]["name"] == "system:auth-delegator"
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]


def test_hub_with_a_token_secret(helm: Helm) -> None:
    docs = helm.template(*VALUE_SETS["hub-static-tokens"])
    pod = one(docs, "Deployment", "-hub")["spec"]["template"]["spec"]
    assert "--token-file=/etc/zmachine-hub/tokens" in pod["containers"][0]["args"]
    tokens = next(v for v in pod["volumes"] if v["name"] == "tokens")
    assert tokens["secret"]["secretName"] == "tokens"
    assert not find(docs, "ClusterRoleBinding", "-hub-auth-delegator")  # no cluster rights


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (("hub.enabled=true", "hub.auth=basic"), "at '/hub/auth': value must be one of"),
        (("hub.enabled=true", "hub.auth=tokenSecret"), "needs hub.tokenSecret"),
    ],
)
def test_hub_values_are_checked(helm: Helm, values: tuple[str, ...], message: str) -> None:
    with pytest.raises(HelmError, match=message):
        helm.template(*values)
