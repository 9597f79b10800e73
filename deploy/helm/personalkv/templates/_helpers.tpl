{{/* Chart name. */}}
{{- define "personalkv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: <release>-<chart> unless overridden. */}}
{{- define "personalkv.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "personalkv.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "personalkv.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "answering"). */}}
{{- define "personalkv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "personalkv.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The S3 object store URL PERSONALKV_STORAGE_URL expects. */}}
{{- define "personalkv.storageUrl" -}}
{{- with .Values.external.s3 -}}
s3://{{ .bucket }}?endpoint={{ .endpoint }}&secure={{ .secure }}&region={{ .region }}
{{- end }}
{{- end }}


{{/* namespace: line of every namespaced resource. */}}
{{- define "personalkv.namespace" -}}
namespace: {{ .Release.Namespace }}
{{- end }}

{{/* The image of a pod: (dict "root" $ "gpu" true|false); repository@digest when a digest is set
(a digest given as a whole reference, REPOSITORY@sha256:..., is used as it is). */}}
{{- define "personalkv.image" -}}
{{- $i := .root.Values.image }}
{{- $app := .root.Chart.AppVersion }}
{{- $digest := .gpu | ternary $i.gpuDigest $i.digest }}
{{- $tag := .gpu | ternary ($i.gpuTag | default (printf "%s-cuda" $app)) ($i.tag | default $app) }}
{{- if contains "@" $digest }}{{ $digest }}
{{- else if $digest }}{{ $i.repository }}@{{ $digest }}
{{- else }}{{ $i.repository }}:{{ $tag }}
{{- end }}
{{- end }}

{{/* The ServiceAccount the pods run as. */}}
{{- define "personalkv.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name | default (include "personalkv.fullname" .) }}
{{- else }}
{{- .Values.serviceAccount.name | default "default" }}
{{- end }}
{{- end }}

{{/* Pod-level fields shared by Deployments, Jobs and test Pods. */}}
{{- define "personalkv.podCommon" -}}
serviceAccountName: {{ include "personalkv.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/*
Env entries from Secret references of one container: (dict "root" $ "server" bool "gpu" bool).
Workers do not get the token HMAC key; only model loaders get HF_TOKEN.
*/}}
{{- define "personalkv.secretEnv" -}}
{{- $secrets := .root.Values.secrets }}
{{- $refs := dict }}
{{- if $secrets.s3AccessKey.name }}
{{- $_ := set $refs "PERSONALKV_STORAGE_ACCESS_KEY" $secrets.s3AccessKey }}
{{- end }}
{{- if $secrets.s3SecretKey.name }}
{{- $_ := set $refs "PERSONALKV_STORAGE_SECRET_KEY" $secrets.s3SecretKey }}
{{- end }}
{{- if $secrets.milvusToken.name }}
{{- $_ := set $refs "PERSONALKV_INDEX_TOKEN" $secrets.milvusToken }}
{{- end }}
{{- if $secrets.redisUrl.name }}
{{- $_ := set $refs "PERSONALKV_CELERY_BROKER_URL" $secrets.redisUrl }}
{{- end }}
{{- if .server }}
{{- $_ := set $refs "PERSONALKV_AUTH_SECRET" $secrets.authSecret }}
{{- end }}
{{- if and .gpu $secrets.hfToken.name }}
{{- $_ := set $refs "HF_TOKEN" $secrets.hfToken }}
{{- end }}
{{- range $env, $ref := $refs }}
- name: {{ $env }}
  valueFrom: {secretKeyRef: {name: {{ $ref.name | quote }}, key: {{ $ref.key | quote }}}}
{{- end }}
{{- end }}

{{/*
Without static S3 keys the library must not fall back to its dev default key: an empty key
makes the S3 client use the pod's identity (IRSA web identity token).
*/}}
{{- define "personalkv.noStaticS3Keys" -}}
{{- if not .Values.secrets.s3AccessKey.name }}
- {name: PERSONALKV_STORAGE_ACCESS_KEY, value: ""}
- {name: PERSONALKV_STORAGE_SECRET_KEY, value: ""}
{{- end }}
{{- end }}

{{/* The scratch volumes (/tmp, /dev/shm) of every pod, and their mounts. */}}
{{- define "personalkv.scratchVolumes" -}}
- name: tmp
  emptyDir: {sizeLimit: {{ .Values.scratch.tmpSizeLimit }}}
- name: shm
  emptyDir: {medium: Memory, sizeLimit: {{ .Values.scratch.shmSizeLimit }}}
{{- end }}
{{- define "personalkv.scratchMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: shm, mountPath: /dev/shm}
{{- end }}

{{/* Redis HOST:PORT and database of the broker, for KEDA: keda.* or parsed from the URL. */}}
{{- define "personalkv.redisAddress" -}}
{{- .Values.keda.redisAddress | default (urlParse .Values.external.redis.url).host }}
{{- end }}
{{- define "personalkv.redisDatabase" -}}
{{- $path := (urlParse .Values.external.redis.url).path | trimPrefix "/" }}
{{- .Values.keda.databaseIndex | default $path | default "0" }}
{{- end }}

{{/* The TLS Secret's name. */}}
{{- define "personalkv.tlsSecretName" -}}
{{- .Values.tls.secretName | default (printf "%s-tls" (include "personalkv.fullname" .)) }}
{{- end }}
