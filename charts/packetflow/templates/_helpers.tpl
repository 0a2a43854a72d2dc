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
  verbs: ["get", "list", "watch"]
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

{{- /*
Zero trust for the chart's own workloads (gateway, MCP aggregate): their SPIFFE ID, the
cert-manager Certificate of it (as the operator renders for runtime pods), and where the Secret
is mounted and named. Arguments: dict root, name (also the ServiceAccount), namespace,
component.
*/}}
{{- define "packetflow.spiffeId" -}}
{{- printf "spiffe://%s/ns/%s/sa/%s" .root.Values.security.mtls.trustDomain .namespace .name -}}
{{- end -}}

{{- define "packetflow.identityCertificate" -}}
{{- if eq .root.Values.security.mtls.issuer "operator" }}
# {{ .name }}-identity: issued by the operator's own authority (PACKETFLOW_OPERATOR_IDENTITIES)
{{- else }}
{{- $issuer := splitList "/" .root.Values.security.mtls.issuer }}
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: {{ .name }}-identity
  namespace: {{ .namespace }}
  labels:
    {{- include "packetflow.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  secretName: {{ .name }}-identity
  duration: 24h
  renewBefore: 8h
  privateKey:
    algorithm: ECDSA
    size: 256
    rotationPolicy: Always
  usages: [digital signature, key encipherment, server auth, client auth]
  uris:
    - {{ include "packetflow.spiffeId" . | quote }}
  dnsNames:
    - {{ .name }}
    - {{ .name }}.{{ .namespace }}
    - {{ .name }}.{{ .namespace }}.svc
    - {{ .name }}.{{ .namespace }}.svc.{{ .root.Values.clusterDomain }}
  issuerRef:
    group: cert-manager.io
    kind: {{ first $issuer }}
    name: {{ last $issuer }}
{{- end }}
{{- end -}}

{{- define "packetflow.identityEnv" -}}
- name: PACKETFLOW_TLS_CERT
  value: /etc/packetflow-identity/tls.crt
- name: PACKETFLOW_TLS_KEY
  value: /etc/packetflow-identity/tls.key
- name: PACKETFLOW_TLS_CA
  value: /etc/packetflow-identity/ca.crt
- name: PACKETFLOW_HEALTH_ADDRESS
  value: "0.0.0.0:{{ .Values.security.mtls.healthPort }}"
{{- end -}}

{{- define "packetflow.identityVolume" -}}
- name: identity
  secret:
    secretName: {{ .name }}-identity
    defaultMode: 0440
{{- end -}}

{{/*
The chart's workloads the operator's own authority issues certificates for (mtls.issuer
"operator"), as "namespace/name" (a JSON list): the gateway and the MCP aggregate.
*/}}
{{- define "packetflow.operatorIdentities" -}}
{{- $ids := list }}
{{- if .Values.gateway.enabled }}
{{- $ids = append $ids (printf "%s/%s" .Release.Namespace (include "packetflow.gatewayName" .)) }}
{{- end }}
{{- if .Values.mcp.aggregate.enabled }}
{{- $ids = append $ids (printf "%s/%s" (include "packetflow.mcpAggregateNamespace" .) (include "packetflow.mcpAggregateName" .)) }}
{{- end }}
{{- toJson $ids -}}
{{- end -}}

{{/*
With mtls.issuer "operator": what the operator's authority calls (AUTHORITY_PERMISSIONS in
operator/packetflow/operator/permissions.py), in every namespace it writes identity Secrets to.
*/}}
{{- define "packetflow.authorityRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "create", "patch"]
{{- end -}}

{{- define "packetflow.trustedForwarders" -}}
{{- $ids := list }}
{{- if .Values.gateway.enabled }}
{{- $ids = append $ids (include "packetflow.spiffeId" (dict "root" . "name" (include "packetflow.gatewayName" .) "namespace" .Release.Namespace)) }}
{{- end }}
{{- if .Values.mcp.aggregate.enabled }}
{{- $ids = append $ids (include "packetflow.spiffeId" (dict "root" . "name" (include "packetflow.mcpAggregateName" .) "namespace" (include "packetflow.mcpAggregateNamespace" .))) }}
{{- end }}
{{- toJson $ids -}}
{{- end -}}
