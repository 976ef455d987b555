"""What each driver declares beyond libcloud's ``NodeDriver`` API, and the one place
that reads those declarations.

libcloud's own ``features`` dict says little (``{"create_node": ["ssh_key"]}``), and
how a driver takes tags or the SSH key differs by keyword.  So every driver orch uses
declares a :class:`DriverFeatures`: ours as the class attribute ``orch_features``,
libcloud's stock drivers in :data:`STOCK` by their libcloud ``type`` (so subclasses,
such as a test adapter of EC2, inherit it).  The engine asks the declaration; it never
compares a driver's name or probes a signature.

>>> from orchestrator.provision.drivers.local import LocalNodeDriver  # doctest: +SKIP
>>> features_of(LocalNodeDriver).tags  # doctest: +SKIP
'ex_tags'
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

TagArgument = Literal["ex_tags", "ex_metadata", "ex_labels", "ex_create_attr"]
TagStyle = Literal["dict", "strings"]
KeyStyle = Literal["auth", "key_pair", "metadata", "account_key"]
UserDataArgument = Literal["ex_userdata", "ex_user_data", "ex_customdata", "ex_metadata"]
Meaning = Literal["capacity", "quota", "transient", "auth", "final"]


@dataclass(frozen=True)
class ErrorCodes:
    """What a cloud's API error codes and HTTP statuses mean to orch, beyond the codes
    every driver shares (``cloud_errors``): ``codes`` by the code the API names (EC2's
    ``InsufficientInstanceCapacity``, GCE's ``ZONE_RESOURCE_POOL_EXHAUSTED``, Azure's
    ``SkuNotAvailable``, DigitalOcean's ``unprocessable_entity``...), ``statuses`` by
    HTTP status where the cloud gives no code (OpenStack's 413 for a quota).  A code
    decides before a status."""

    codes: Mapping[str, Meaning] = field(default_factory=dict)
    statuses: Mapping[int, Meaning] = field(default_factory=dict)
    faults: Mapping[str, Meaning] = field(default_factory=dict)
    """A node the cloud accepted and then failed (ERROR), by how its fault message
    begins: Nova's scheduler gives no code, only ``No valid host was found`` (capacity)."""
    uncoded: Mapping[int, Meaning] = field(default_factory=dict)
    """An HTTP status that carries no code at all, where only one endpoint answers so
    (GCE: its API always names a reason; Google's token endpoint answers ``400
    invalid_grant``, of which libcloud keeps only the description: the credentials)."""


@dataclass(frozen=True)
class DriverFeatures:
    """How orch drives one kind of driver.

    ``tags``: the ``create_node`` keyword that takes orch's tags (None: the driver
    cannot tag, and orch refuses to create nodes it could not find again);
    ``ex_create_attr`` means its ``"tags"`` entry (DigitalOcean).  ``tag_style``: a
    dict of key to value (``"dict"``), or a list of ``key:value`` strings where the
    cloud's tags are plain strings (``"strings"``: DigitalOcean).
    ``ssh_key``: how ``create_node`` gets the fleet's public key: ``"auth"``, as
    ``auth=NodeAuthSSHKey(...)``; ``"key_pair"``, as ``ex_keyname=`` of a key pair
    imported once per workspace (EC2, OpenStack); ``"metadata"``, as the instance
    metadata item ``ssh-keys`` (``USER:KEY``, GCE); ``"account_key"``, as
    ``ex_create_attr``'s ``ssh_keys`` (its id) of a key imported once into the account
    (DigitalOcean).
    ``user_data``: the ``create_node`` keyword that takes cloud-init user data
    (``ex_metadata``: its ``user-data`` item, GCE), by which a cloud node gets the host
    key orch made for it and pinned before the node existed (None: the driver reports
    ``host_key`` itself, as ours do, or its nodes cannot be bootstrapped).
    ``login_user``: the ``create_node`` keyword naming the login user the key is for
    (Azure's ``ex_user_name``), where the cloud makes it.
    ``location_argument``: the ``create_node`` keyword that takes the placement's
    location (None: its ``create_node`` takes none; OpenStack's one location is the
    region the registration names, an availability zone is a create option).
    ``create_options``: the registration's ``options`` that go to ``create_node``
    rather than to the driver's constructor (Azure's ``ex_resource_group``...).
    ``driver_options``: constructor options orch gives unless the registration sets
    them (OpenStack's ``api_version``: libcloud's factory defaults to its 1.1 driver,
    which lists images through Nova's image proxy, gone since microversion 2.36).
    ``required_options``: create options without which the driver cannot create a
    node (Azure's resource group and virtual network): a registration without one is
    refused when its driver is made, before anything is created.
    ``destroy_options``: keyword arguments orch gives its ``destroy_node`` (Azure's:
    poll every second, for up to two minutes, for the VM to go before its NIC and disk
    are deleted, where libcloud sleeps ten seconds between polls).
    ``errors``: what its API's error codes mean (capacity, quota, throttling, auth).
    ``node_folders``: one of orch's own drivers, which keeps its nodes' folders under
    ``.orch/drivers/DRIVER/PROVIDER`` (it takes ``root=``) and enforces the provider's
    ``max_nodes`` itself (it takes ``max_nodes=``).
    ``fleet_key_file``: the driver reaches machines itself with the fleet's private
    key (it takes ``key_file=``): the ``hosts`` driver cleans a machine it releases.
    ``bootstrap``: nodes can be bootstrapped over SSH at the address the driver
    reports (False: provisioned only, whatever the registration says).

    Where a node's agent reaches this machine is not a driver-wide answer: a driver
    that knows records it in the node's ``extra["gateway"]`` (``local``: 127.0.0.1;
    ``netns``: its bridge); for the others it is ``scheduler_address`` in orch.yaml.
    """

    tags: TagArgument | None
    ssh_key: KeyStyle = "auth"
    tag_style: TagStyle = "dict"
    user_data: UserDataArgument | None = None
    login_user: str | None = None
    location_argument: Literal["location"] | None = "location"
    token_cache: str | None = None
    """The constructor keyword naming the file where the driver caches its access token
    (GCE's ``credential_file``, else ``~/.google_libcloud_auth.PROJECT``): orch gives it
    the workspace's ``.orch/tokens/PROVIDER.json``."""
    create_options: frozenset[str] = frozenset()
    driver_options: Mapping[str, str] = field(default_factory=dict)
    destroy_options: Mapping[str, int] = field(default_factory=dict)
    required_options: frozenset[str] = frozenset()
    errors: ErrorCodes = field(default_factory=ErrorCodes)
    node_folders: bool = False
    fleet_key_file: bool = False
    bootstrap: bool = True


STOCK: dict[str, DriverFeatures] = {
    "ec2": DriverFeatures(tags="ex_metadata", ssh_key="key_pair", user_data="ex_userdata"),
    "openstack": DriverFeatures(  # (Nova's JSON error key never reaches the message: statuses decide)
        tags="ex_metadata", ssh_key="key_pair", user_data="ex_userdata", location_argument=None,
        create_options=frozenset({"ex_availability_zone", "ex_config_drive", "ex_disk_config"}),
        driver_options={"api_version": "2.2"},
        errors=ErrorCodes(statuses={401: "auth", 403: "quota", 413: "quota"},
                          faults={"No valid host was found": "capacity"})),
    "gce": DriverFeatures(  # (an operation's error code, or the reason of an HTTP error, as GoogleBaseError.code)
        tags="ex_labels", ssh_key="metadata", user_data="ex_metadata", token_cache="credential_file",
        errors=ErrorCodes(codes={
            "ZONE_RESOURCE_POOL_EXHAUSTED": "capacity", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS": "capacity",
            "QUOTA_EXCEEDED": "quota", "quotaExceeded": "quota", "rateLimitExceeded": "transient",
            "userRateLimitExceeded": "transient", "RATE_LIMIT_EXCEEDED": "transient", "authError": "auth"},
            statuses={401: "auth"}, uncoded={400: "auth"})),
    "azure_arm": DriverFeatures(
        tags="ex_tags", ssh_key="auth", user_data="ex_customdata", login_user="ex_user_name",
        create_options=frozenset({"ex_resource_group", "ex_storage_account", "ex_blob_container", "ex_network",
                                  "ex_subnet", "ex_use_managed_disks", "ex_storage_account_type", "ex_disk_size",
                                  "ex_os_disk_delete"}),
        destroy_options={"ex_poll_wait": 1, "ex_poll_qty": 120},
        required_options=frozenset({"ex_resource_group", "ex_network"}),
        errors=ErrorCodes(codes={  # (Azure AD's token endpoint answers 401 with AADSTS codes: status decides)
            "SkuNotAvailable": "capacity", "AllocationFailed": "capacity", "ZonalAllocationFailed": "capacity",
            "OverconstrainedAllocationRequest": "capacity", "QuotaExceeded": "quota",
            "OperationNotAllowed": "quota", "TooManyRequests": "transient", "ExpiredAuthenticationToken": "auth",
            "InvalidAuthenticationToken": "auth", "AuthenticationFailed": "auth"}, statuses={401: "auth"})),
    "digitalocean": DriverFeatures(  # (libcloud keeps only the message and status of DO's {"id", "message"}:
        # 401 is InvalidCredsError, 429 RateLimitReachedError; 422 unprocessable_entity is both "Size is not
        # available in this region" and the droplet limit: capacity, whose failover covers both; 403 forbidden
        # is a token without the write scope)
        tags="ex_create_attr", tag_style="strings", ssh_key="account_key", user_data="ex_user_data",
        errors=ErrorCodes(statuses={422: "capacity", 403: "auth"})),
}
"""libcloud's stock drivers orch has been proven with, by ``NodeDriver.type``."""

_TAG_ARGUMENTS: tuple[TagArgument, ...] = ("ex_tags", "ex_metadata", "ex_labels")  # (each a dict)


def features_of(cls: type) -> DriverFeatures:
    """The driver class's declaration: its own ``orch_features``, else the stock table's
    entry for its libcloud ``type``, else one read once from its ``create_node``
    signature (a stock driver orch has no declaration for yet)."""
    declared = getattr(cls, "orch_features", None)
    if isinstance(declared, DriverFeatures):
        return declared
    # (libcloud's OpenStack factory class, which get_driver returns, has no type, only
    # its api_name; the classes it makes have both)
    stock = STOCK.get(str(getattr(cls, "type", None) or getattr(cls, "api_name", "")))
    if stock is not None:
        return stock
    return _read_from_signature(cls)


def _read_from_signature(cls: type) -> DriverFeatures:
    create = getattr(cls, "create_node", None)
    params = inspect.signature(create).parameters if create is not None else {}
    tags = next((name for name in _TAG_ARGUMENTS if name in params), None)
    return DriverFeatures(tags=tags, ssh_key="key_pair" if "ex_keyname" in params else "auth")
