{{/* Names, labels and shared snippets. */}}

{{- define "zmachine.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "zmachine.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object; "component" is controller, agent or tls. */}}
{{- define "zmachine.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: zmachine-operator
{{ include "zmachine.selectorLabels" . }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "zmachine.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zmachine.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "zmachine.controller.serviceAccountName" -}}
{{- default (printf "%s-controller" (include "zmachine.fullname" .)) .Values.controller.serviceAccount.name -}}
{{- end -}}

{{- define "zmachine.agent.serviceAccountName" -}}
{{- default (printf "%s-agent" (include "zmachine.fullname" .)) .Values.agent.serviceAccount.name -}}
{{- end -}}

{{- define "zmachine.console.serviceAccountName" -}}
{{- default (printf "%s-console" (include "zmachine.fullname" .)) .Values.console.serviceAccount.name -}}
{{- end -}}

{{/*
The console server's serving certificate and its CA (the APIService's caBundle), as JSON:
kept from the Secret in the cluster, generated when there is none. The API server checks
the certificate against <service>.<namespace>.svc. Memoized like zmachine.tls.material.
*/}}
{{- define "zmachine.console.tls" -}}
{{- if not (hasKey .Values.console "_tls") -}}
{{- $name := printf "%s-console" (include "zmachine.fullname" .) -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (printf "%s-serving" $name) | default dict -}}
{{- $found := get $existing "data" | default dict -}}
{{- $tls := dict -}}
{{- if and (hasKey $found "ca.crt") (hasKey $found "tls.crt") (hasKey $found "tls.key") -}}
{{- range list "ca.crt" "tls.crt" "tls.key" }}{{ $_ := set $tls . (get $found . | b64dec) }}{{ end -}}
{{- else -}}
{{- $days := int .Values.tls.validityDays -}}
{{- $ca := genCA (printf "%s-ca" $name) $days -}}
{{- $dns := printf "%s.%s.svc" $name .Release.Namespace -}}
{{- $cert := genSignedCert $dns nil (list $dns) $days $ca -}}
{{- $tls = dict "ca.crt" $ca.Cert "tls.crt" $cert.Cert "tls.key" $cert.Key -}}
{{- end -}}
{{- $_ := set .Values.console "_tls" $tls -}}
{{- end -}}
{{- toJson (get .Values.console "_tls") -}}
{{- end -}}

{{- define "zmachine.tls.secretName" -}}
{{- default (printf "%s-tls" (include "zmachine.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{/* image: repository:tag, tag defaulting to the appVersion. Argument: .image values. */}}
{{- define "zmachine.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}


{{/*
The mTLS material as JSON (PEM files plus "rotation", the stamp they were made for): kept
from the Secret already in the cluster (so upgrades keep the CA), generated when there is none
or when tls.rotation is set and differs from the stamp on the Secret. Memoized in .Values because every genCA call makes a new CA, and the Secret and
the pods' checksum must see the same one.
*/}}
{{- define "zmachine.tls.material" -}}
{{- if not (hasKey .Values.tls "_material") -}}
{{- $keys := list "ca.crt" "server.crt" "server.key" "client.crt" "client.key" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "zmachine.tls.secretName" .) | default dict -}}
{{- $found := get $existing "data" | default dict -}}
{{- $annotations := (get $existing "metadata" | default dict).annotations | default dict -}}
{{- $stamp := get $annotations "zos.threefold.io/tls-rotation" | toString -}}
{{- $wanted := .Values.tls.rotation | toString -}}
{{- /* An empty tls.rotation never rotates: upgrades that reset values stay harmless. */ -}}
{{- $keep := or (eq $wanted "") (eq $wanted $stamp) -}}
{{- range $keys -}}
{{- if not (hasKey $found .) }}{{ $keep = false }}{{ end -}}
{{- end -}}
{{- $material := dict -}}
{{- if $keep -}}
{{- range $keys }}{{ $_ := set $material . (get $found . | b64dec) }}{{ end -}}
{{- else -}}
{{- $days := int .Values.tls.validityDays -}}
{{- $ca := genCA (printf "%s-ca" (include "zmachine.fullname" .)) $days -}}
{{- $names := .Values.tls.agentServerNames -}}
{{- $server := genSignedCert (first $names) .Values.tls.agentServerIPs $names $days $ca -}}
{{- $client := genSignedCert "zmachine-controller" nil nil $days $ca -}}
{{- $material = dict "ca.crt" $ca.Cert "server.crt" $server.Cert "server.key" $server.Key "client.crt" $client.Cert "client.key" $client.Key -}}
{{- end -}}
{{- $_ := set $material "rotation" (default $stamp $wanted) -}}
{{- $_ := set .Values.tls "_material" $material -}}
{{- end -}}
{{- toJson (get .Values.tls "_material") -}}
{{- end -}}

{{/*
Pod template annotations: the user's, plus a checksum of generated certificates so that a
rotation rolls the pods. Arguments: root, annotations.
*/}}
{{- define "zmachine.podAnnotations" -}}
{{- $annotations := deepCopy (.annotations | default dict) -}}
{{- if not .root.Values.tls.existingSecret -}}
{{- $_ := set $annotations "checksum/tls" (include "zmachine.tls.material" .root | sha256sum) -}}
{{- end -}}
{{- with $annotations -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{/*
ClusterRoleBinding for the component's ClusterRole, plus a Role on Leases in the release
namespace and its RoleBinding. Arguments: root, component, leaseVerbs.
*/}}
{{- define "zmachine.rbac.bindings" -}}
{{- $root := .root -}}
{{- $name := printf "%s-%s" (include "zmachine.fullname" $root) .component -}}
{{- $labels := include "zmachine.labels" . -}}
{{- $subject := dict "kind" "ServiceAccount" "name" (include (printf "zmachine.%s.serviceAccountName" .component) $root) "namespace" $root.Release.Namespace -}}
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ $name }}
  labels:
    {{- $labels | nindent 4 }}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {{ $name }}}
subjects: [{{ toJson $subject }}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- $labels | nindent 4 }}
rules:
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    verbs: {{ toJson .leaseVerbs }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- $labels | nindent 4 }}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: {{ $name }}}
subjects: [{{ toJson $subject }}]
{{- end -}}
