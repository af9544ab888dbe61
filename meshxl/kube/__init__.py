"""Kubernetes: sidecar injection (pure patch builder, admission webhook, offline inject).

Nothing here talks to the Kubernetes API: the webhook answers the API server's
AdmissionReviews, and ``meshxl inject`` rewrites YAML files.
"""

from .inject import (
    ANNOTATION_ANTI_AFFINITY,
    ANNOTATION_APP_PORT,
    ANNOTATION_IP_FAMILY,
    ANNOTATION_PROXY,
    ANNOTATION_STATUS,
    DEFAULT_IMAGE,
    ENVOY_CONTAINER,
    ENVOY_VOLUME,
    HOSTNAME_KEY,
    LABEL_CLUSTER,
    LABEL_INJECT,
    LABEL_INSTALLATION,
    LABEL_SITE,
    LABEL_WEIGHT,
    NAMESPACE_LABEL,
    STATESYNC_CONTAINER,
    ZONE_KEY,
    AntiAffinity,
    Decision,
    InjectConfig,
    InjectError,
    PatchResult,
    decide,
    mutate_pod,
    pod_patch,
)
from .workloads import InjectReport, inject_documents, inject_object, inject_yaml

__all__ = [
    "ANNOTATION_ANTI_AFFINITY", "ANNOTATION_APP_PORT", "ANNOTATION_IP_FAMILY",
    "ANNOTATION_PROXY", "ANNOTATION_STATUS", "DEFAULT_IMAGE", "ENVOY_CONTAINER",
    "ENVOY_VOLUME", "HOSTNAME_KEY", "LABEL_CLUSTER", "LABEL_INJECT", "LABEL_INSTALLATION",
    "LABEL_SITE", "LABEL_WEIGHT", "NAMESPACE_LABEL", "STATESYNC_CONTAINER", "ZONE_KEY",
    "AntiAffinity", "Decision", "InjectConfig", "InjectError", "InjectReport", "PatchResult",
    "decide", "inject_documents", "inject_object", "inject_yaml", "mutate_pod", "pod_patch",
]
