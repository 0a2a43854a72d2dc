{{/* Names and labels shared by every template. */}}

{{- define "packetflow.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name; the chart name alone when the release already carries it. */}}
{{- define "packetflow.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "packetflow.operatorName" -}}
{{- printf "%s-operator" (include "packetflow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "packetflow.gatewayName" -}}
{{- printf "%s-gateway" (include "packetflow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "packetflow.mcpAggregateName" -}}
{{- printf "%s-mcp" (include "packetflow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "packetflow.mcpAggregateNamespace" -}}
{{- default .Release.Namespace .Values.mcp.aggregate.namespace -}}
{{- end -}}

{{- define "packetflow.mcpAggregateSelectorLabels" -}}
app.kubernetes.io/name: {{ include "packetflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mcp-aggregate
{{- end -}}

{{- define "packetflow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "packetflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: packetflow
{{- end -}}

{{- define "packetflow.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "packetflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "packetflow.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "packetflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "packetflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "packetflow.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "packetflow.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
RBAC rules: exactly what the operator calls (PERMISSIONS in operator/packetflow/operator/
permissions.py, which says who makes each call); tests/unit/test_chart.py fails when the two
differ. Never a "*", no delete (children go by ownerReferences), no update (merge patches).
Namespaced rules go into the ClusterRole (all namespaces) or a Role per watched namespace.
*/}}
{{- define "packetflow.namespacedRules" -}}
- apiGroups: ["packetflow.io"]
  resources: ["capabilities"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["packetflow.io"]
  resources: ["capabilities/status"]
  verbs: ["patch"]
- apiGroups: ["packetflow.io"]
  resources: ["actors"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["packetflow.io"]
  resources: ["actors/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["packetflow.io"]
  resources: ["federations"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["packetflow.io"]
  resources: ["federations/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["cert-manager.io"]
  resources: ["certificates"]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- end -}}

{{/*
Cluster-scoped rules need a ClusterRole even when namespaces are listed. The operator needs
none today (kopf's namespace and CRD scanning is off); a rule added here renders everywhere.
*/}}
{{- define "packetflow.clusterRules" -}}
{{- end -}}

{{/* Namespaces the gateway serves (a JSON list): gateway.namespaces, else the operator's. */}}
{{- define "packetflow.gatewayNamespaces" -}}
{{- default .Values.watchNamespaces .Values.gateway.namespaces | toJson -}}
{{- end -}}

{{/*
The gateway's RBAC rules: read-only, exactly what it calls (GATEWAY_PERMISSIONS in
runtime/packetflow/gateway/kube.py); tests/unit/test_chart.py fails when the two differ.
*/}}
{{- define "packetflow.gatewayRules" -}}
- apiGroups: ["packetflow.io"]
  resources: ["capabilities"]
  verbs: ["list", "watch"]
- apiGroups: ["packetflow.io"]
  resources: ["actors"]
  verbs: ["list", "watch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
{{- end -}}
