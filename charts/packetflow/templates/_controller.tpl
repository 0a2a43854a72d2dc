{{/* Names, labels and RBAC of the routing controller (`packetflow controller`). */}}

{{- define "packetflow.controllerName" -}}
{{- printf "%s-controller" (include "packetflow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "packetflow.controllerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "packetflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{/*
RBAC rules: exactly what the controller calls (CONTROLLER_PERMISSIONS in
operator/packetflow/operator/routing/permissions.py, which says why); tests/unit/test_chart.py
fails when the two differ. It polls (list, no watch), writes replicas through the scale
subresource, canary weights and approved changes as spec patches, its status keys, Events.
*/}}
{{- define "packetflow.controllerRules" -}}
- apiGroups: ["packetflow.io"]
  resources: ["capabilities"]
  verbs: ["list", "patch"]
- apiGroups: ["packetflow.io"]
  resources: ["capabilities/scale"]
  verbs: ["patch"]
- apiGroups: ["packetflow.io"]
  resources: ["capabilities/status"]
  verbs: ["patch"]
- apiGroups: ["packetflow.io"]
  resources: ["actors"]
  verbs: ["list"]
- apiGroups: ["packetflow.io"]
  resources: ["actors/scale"]
  verbs: ["patch"]
- apiGroups: ["packetflow.io"]
  resources: ["actors/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
