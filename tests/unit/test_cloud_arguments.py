"""How orch speaks to each stock cloud driver, as the drivers declare it: the tags, the
fleet key, the user data carrying the host key orch pins, the options that go to
``create_node``, and what each cloud's error codes mean.  Pure: no driver is called
here (the clouds' own tests drive their protocol peers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.google import GoogleBaseError
from libcloud.compute.base import Node, NodeAuthSSHKey
from libcloud.compute.types import NodeState

from orchestrator.errors import (
    ProviderAuthError,
    ProviderCapacityError,
    ProviderError,
    ProviderQuotaError,
    ProviderTransientError,
)
from orchestrator.provision.cloud_errors import api_error_code, map_libcloud_errors
from orchestrator.provision.drivers.features import STOCK
from orchestrator.provision.handle import ProviderHandle
from orchestrator.provision.tags import node_tags, tag_arguments
from orchestrator.provision.userdata import HostKey, cloud_config, merged, user_data_arguments
from orchestrator.workspace import Workspace
from tests.helpers.provision import workspace_with_provider

TAGS = {"orch-workspace": "ws1", "orch-family": "workers", "orch-node": "w0-1a2b"}


@pytest.mark.parametrize(("driver", "expected"), [
    ("ec2", {"ex_metadata": TAGS}),
    ("openstack", {"ex_metadata": TAGS}),
    ("gce", {"ex_labels": TAGS}),
    ("azure_arm", {"ex_tags": TAGS}),
    ("digitalocean", {"ex_create_attr": {"tags": ["orch-workspace:ws1", "orch-family:workers",
                                                  "orch-node:w0-1a2b"]}}),
])
def test_each_cloud_takes_the_tags_its_own_way(driver: str, expected: dict[str, Any]) -> None:
    assert tag_arguments(STOCK[driver], TAGS) == expected


@pytest.mark.parametrize("listed", [
    {"tags": TAGS}, {"labels": TAGS},
    {"tags": ["orch-workspace:ws1", "orch-family:workers", "orch-node:w0-1a2b", "team-blue"]},
])
def test_the_tags_are_read_back_from_what_each_cloud_lists(listed: dict[str, Any]) -> None:
    """A dict of tags or labels, or DigitalOcean's plain strings (a string without a
    colon is someone else's tag, not orch's)."""
    node = Node("i-1", "w0-1a2b", NodeState.RUNNING, [], [], driver=None, extra=listed)  # type: ignore[arg-type]
    assert node_tags(node) == TAGS


def test_the_user_data_installs_the_pinned_host_key_and_no_other() -> None:
    key = HostKey.generate()
    document = yaml.safe_load(cloud_config(key))
    assert cloud_config(key).startswith("#cloud-config\n")
    assert document["ssh_deletekeys"] is True and document["ssh_genkeytypes"] == []
    assert document["ssh_keys"]["ed25519_public"] == key.public
    private = serialization.load_ssh_private_key(document["ssh_keys"]["ed25519_private"].encode(), None)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert public.decode() == key.public, "the private half in the user data is not the pinned key's"
    assert HostKey.generate().public != key.public


@pytest.mark.parametrize(("driver", "keyword"), [
    ("ec2", "ex_userdata"), ("openstack", "ex_userdata"), ("digitalocean", "ex_user_data"),
])
def test_each_cloud_takes_the_user_data_by_its_keyword(driver: str, keyword: str) -> None:
    assert user_data_arguments(STOCK[driver], "#cloud-config\n") == {keyword: "#cloud-config\n"}


def test_azure_takes_the_user_data_as_bytes() -> None:
    """libcloud's Azure driver base64-encodes ``ex_customdata`` with ``b64encode``,
    which takes bytes only (and sends the result through simplejson)."""
    assert user_data_arguments(STOCK["azure_arm"], "#cloud-config\n") == {"ex_customdata": b"#cloud-config\n"}


def test_gce_takes_the_key_and_the_user_data_in_one_metadata() -> None:
    key_args = {"ex_metadata": {"ssh-keys": "root:ssh-ed25519 AAAA"}}
    both = merged(key_args, user_data_arguments(STOCK["gce"], "#cloud-config\n"), tag_arguments(STOCK["gce"], TAGS))
    assert both == {"ex_metadata": {"ssh-keys": "root:ssh-ed25519 AAAA", "user-data": "#cloud-config\n"},
                    "ex_labels": TAGS}
    with pytest.raises(ValueError, match="'auth' given twice"):
        merged({"auth": 1}, {"auth": 2})
    with pytest.raises(ValueError, match="'ex_metadata' given twice"):
        merged({"ex_metadata": {"a": 1}}, {"ex_metadata": {"a": 2}})


def _handle(tmp_path: Path, driver: str, **provider: Any) -> tuple[Workspace, ProviderHandle]:
    ws, store = workspace_with_provider(tmp_path / "ws", {"driver": driver, **provider})
    store.close()
    from orchestrator.config import load_provider
    return ws, ProviderHandle(ws, load_provider(ws, "p"))


def test_the_fleet_key_as_gce_metadata_for_the_registered_user(tmp_path: Path) -> None:
    ws, handle = _handle(tmp_path, "gce", ssh_user="orch")
    public = ws.ssh_key.with_suffix(".pub").read_text().strip()
    assert handle.key_arguments(None) == {"ex_metadata": {"ssh-keys": f"orch:{public}"}}  # type: ignore[arg-type]


def test_the_fleet_key_for_azure_with_its_login_user_and_the_create_options(tmp_path: Path) -> None:
    """Azure makes the login user: ``ex_user_name`` is the registration's ssh_user; the
    resource group and network are create options, not the driver constructor's."""
    _ws, handle = _handle(tmp_path, "azure_arm", ssh_user="azureuser",
                         options={"tenant_id": "t", "subscription_id": "s", "ex_resource_group": "rg",
                                  "ex_network": "net"})
    args = handle.key_arguments(None)  # type: ignore[arg-type]
    assert isinstance(args.pop("auth"), NodeAuthSSHKey) and args == {"ex_user_name": "azureuser"}
    assert handle.create_options() == {"ex_resource_group": "rg", "ex_network": "net"}


@pytest.mark.parametrize("missing", ["ex_resource_group", "ex_network"])
def test_azure_without_its_resource_group_or_network_is_refused_naming_the_option(tmp_path: Path,
                                                                                 missing: str) -> None:
    """libcloud's create_node would fail each node alone (a TypeError, a ValueError):
    the registration is refused when its driver is made, before anything is created."""
    from orchestrator.errors import ConfigError
    from orchestrator.provision.registry import make_driver
    options = {"tenant_id": "t", "subscription_id": "s", "ex_resource_group": "rg", "ex_network": "net"}
    del options[missing]
    ws, handle = _handle(tmp_path, "azure_arm", options=options, credentials={"key": "env:HOME"})
    with pytest.raises(ConfigError) as caught:
        make_driver(ws, handle.config)
    assert str(caught.value).startswith(f"providers/p.yaml: options: driver 'azure_arm' needs the option {missing} ")
    assert "\n" not in str(caught.value) and f"add `{missing}: ...` under options" in str(caught.value)


def test_the_login_user_must_look_like_one(tmp_path: Path) -> None:
    from orchestrator.errors import ConfigError
    with pytest.raises(ConfigError, match="ssh_user"):
        _handle(tmp_path, "gce", ssh_user="root; rm -rf /")


class _HTTP(BaseHTTPError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(status, body)


@pytest.mark.parametrize(("driver", "error", "kind"), [
    ("gce", GoogleBaseError("The zone does not have enough resources", 503, "ZONE_RESOURCE_POOL_EXHAUSTED"),
     ProviderCapacityError),
    ("gce", GoogleBaseError("Quota 'CPUS' exceeded", 403, "QUOTA_EXCEEDED"), ProviderQuotaError),
    ("gce", GoogleBaseError("Rate limit", 403, "rateLimitExceeded"), ProviderTransientError),
    ("azure_arm", _HTTP(409, '{"error": {"code": "SkuNotAvailable", "message": "not here"}}'),
     ProviderCapacityError),
    ("azure_arm", _HTTP(409, '{"error": {"code": "OperationNotAllowed", "message": "quota"}}'), ProviderQuotaError),
    ("azure_arm", _HTTP(401, '{"error": {"code": "ExpiredAuthenticationToken", "message": "x"}}'),
     ProviderAuthError),
    # What libcloud's Azure driver raises: "[code] message" (AzureJsonResponse.parse_error)
    ("azure_arm", _HTTP(409, "[SkuNotAvailable] The requested size is not available"), ProviderCapacityError),
    ("azure_arm", _HTTP(409, "[AllocationFailed] Allocation failed."), ProviderCapacityError),
    ("azure_arm", _HTTP(409, "[OperationNotAllowed] exceeding approved Cores quota"), ProviderQuotaError),
    ("azure_arm", _HTTP(401, "[ExpiredAuthenticationToken] The access token expiry"), ProviderAuthError),
    ("azure_arm", _HTTP(401, "AADSTS7000215: Invalid client secret provided."), ProviderAuthError),
    ("azure_arm", _HTTP(400, "[InvalidParameter] Required parameter is missing"), ProviderError),
    ("digitalocean", _HTTP(422, '{"id": "unprocessable_entity", "message": "size unavailable"}'),
     ProviderCapacityError),
    ("digitalocean", _HTTP(429, '{"id": "too_many_requests", "message": "slow down"}'), ProviderTransientError),
    ("openstack", _HTTP(413, '{"overLimit": {"message": "Quota exceeded for instances", "code": 413}}'),
     ProviderQuotaError),
    ("openstack", _HTTP(400, '{"badRequest": {"message": "Invalid flavorRef", "code": 400}}'), ProviderError),
    ("ec2", _HTTP(400, "InsufficientInstanceCapacity: no m5 here"), ProviderCapacityError),
])
def test_each_clouds_error_codes_mean_what_it_declares(driver: str, error: Exception, kind: type) -> None:
    with pytest.raises(ProviderError) as caught, map_libcloud_errors("p", STOCK[driver].errors):
        raise error
    assert type(caught.value) is kind, (caught.value, api_error_code(error))
    assert "provider 'p'" in str(caught.value) and "\n" not in str(caught.value)


def test_a_code_another_cloud_declares_means_nothing_here() -> None:
    """DigitalOcean's 422 is capacity there; elsewhere a 422 is a final error."""
    with pytest.raises(ProviderError) as caught, map_libcloud_errors("p", STOCK["azure_arm"].errors):
        raise _HTTP(422, '{"id": "unprocessable_entity", "message": "no"}')
    assert type(caught.value) is ProviderError
