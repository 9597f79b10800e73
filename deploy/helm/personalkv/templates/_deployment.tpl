{{/*
One Deployment. Called by deployment-<name>.yaml with
  (dict "root" $ "name" "answering" "args" (list "serve" "answering")
        "grpcPort" 50052 "metricsPort" 9452 "healthService" "personalkv.v1.AnsweringService")
grpcPort set: a gRPC server (ports, native grpc probes, the auth secret);
values.services.<name>.gpu set: a VLM service (GPU limit, HF model cache at HF_HOME).
*/}}
{{- define "personalkv.deployment" -}}
{{- $root := .root }}
{{- $v := index $root.Values.services .name }}
{{- $gpu := $v.gpu }}
{{- $secrets := $root.Values.secrets }}
{{- /* Env from Secret references only; workers do not get the token HMAC key. */}}
{{- $secretEnv := dict "PERSONALKV_STORAGE_ACCESS_KEY" $secrets.s3AccessKey
      "PERSONALKV_STORAGE_SECRET_KEY" $secrets.s3SecretKey }}
{{- if $secrets.milvusToken.name }}
{{- $_ := set $secretEnv "PERSONALKV_INDEX_TOKEN" $secrets.milvusToken }}
{{- end }}
{{- if $secrets.redisUrl.name }}
{{- $_ := set $secretEnv "PERSONALKV_CELERY_BROKER_URL" $secrets.redisUrl }}
{{- end }}
{{- if .grpcPort }}
{{- $_ := set $secretEnv "PERSONALKV_AUTH_SECRET" $secrets.authSecret }}
{{- end }}
{{- $grace := float64 $root.Values.server.graceS }}
{{- if and .grpcPort (ge $grace (float64 $v.terminationGracePeriodSeconds)) }}
{{- fail (printf "server.graceS must be below services.%s.terminationGracePeriodSeconds" .name) }}
{{- end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "personalkv.fullname" $root }}-{{ .name }}
  labels:
    {{- include "personalkv.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .name }}
spec:
  replicas: {{ $v.replicas }}
  selector:
    matchLabels:
      {{- include "personalkv.selectorLabels" (dict "root" $root "component" .name) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "personalkv.selectorLabels" (dict "root" $root "component" .name) | nindent 8 }}
      annotations:
        {{- $config := include (print $root.Template.BasePath "/configmap.yaml") $root }}
        checksum/config: {{ $config | sha256sum }}
        {{- with $root.Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- range . }}
        - name: {{ . }}
        {{- end }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ .name }}
          {{- $image := $root.Values.image }}
          image: "{{ $image.repository }}:{{ $image.tag | default $root.Chart.AppVersion }}"
          imagePullPolicy: {{ $image.pullPolicy }}
          command: ["personalkv"]
          args: {{ toJson .args }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          envFrom:
            - configMapRef:
                name: {{ include "personalkv.fullname" $root }}
          env:
            {{- range $env, $ref := $secretEnv }}
            - name: {{ $env }}
              valueFrom: {secretKeyRef: {name: {{ $ref.name | quote }}, key: {{ $ref.key | quote }}}}
            {{- end }}
            {{- if $gpu }}
            - name: HF_HOME
              value: {{ $root.Values.modelCache.mountPath | quote }}
            {{- end }}
          {{- if .grpcPort }}
          ports:
            - {name: grpc, containerPort: {{ .grpcPort }}, protocol: TCP}
            - {name: metrics, containerPort: {{ .metricsPort }}, protocol: TCP}
          # Native gRPC probes against grpc.health.v1: the service turns SERVING once it is
          # ready (answering: after the model loaded) and NOT_SERVING on SIGTERM.
          startupProbe:
            grpc: {port: {{ .grpcPort }}, service: {{ .healthService }}}
            periodSeconds: {{ $v.probes.periodSeconds }}
            failureThreshold: {{ $v.probes.startupFailureThreshold }}
          readinessProbe:
            grpc: {port: {{ .grpcPort }}, service: {{ .healthService }}}
            periodSeconds: {{ $v.probes.periodSeconds }}
            failureThreshold: 2
          livenessProbe:
            grpc: {port: {{ .grpcPort }}}
            periodSeconds: {{ $v.probes.periodSeconds }}
            timeoutSeconds: 5
            failureThreshold: 6
          {{- end }}
          resources:
            {{- $res := deepCopy ($v.resources | default dict) }}
            {{- if and $gpu (gt (int $gpu.count) 0) }}
            {{- $limits := merge (dict $gpu.resourceName $gpu.count) ($res.limits | default dict) }}
            {{- $_ := set $res "limits" $limits }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          volumeMounts:
            - {name: tmp, mountPath: /tmp}
            {{- if $gpu }}
            - {name: model-cache, mountPath: {{ $root.Values.modelCache.mountPath }}}
            {{- end }}
      volumes:
        - {name: tmp, emptyDir: {}}
        {{- if $gpu }}
        {{- with $root.Values.modelCache }}
        {{- if eq .type "pvc" }}
        - name: model-cache
          persistentVolumeClaim:
            {{- $created := printf "%s-model-cache" (include "personalkv.fullname" $root) }}
            claimName: {{ .pvc.existingClaim | default $created }}
        {{- else }}
        - name: model-cache
          emptyDir: {sizeLimit: {{ .sizeLimit }}}
        {{- end }}
        {{- end }}
        {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
