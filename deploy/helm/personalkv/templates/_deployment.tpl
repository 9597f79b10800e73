{{/*
One Deployment. Called by deployment-<name>.yaml with
  (dict "root" $ "name" "answering" "args" (list "serve" "answering")
        "grpcPort" 50052 "metricsPort" 9452 "healthService" "personalkv.v1.AnsweringService")
grpcPort set: a gRPC server (ports, native grpc probes, the auth secret, TLS);
no grpcPort: a Celery worker (metrics port probed over HTTP, soft-shutdown window);
values.services.<name>.gpu.count > 0: a VLM service on GPU (CUDA image, GPU limit, HF cache).
*/}}
{{- define "personalkv.deployment" -}}
{{- $root := .root }}
{{- $v := index $root.Values.services .name }}
{{- $loadsModel := hasKey $v "gpu" }}
{{- $gpu := and $loadsModel (gt (int $v.gpu.count) 0) }}
{{- $server := not (empty .grpcPort) }}
{{- $tls := and $server $root.Values.tls.enabled }}
{{- $metricsPort := .metricsPort | default $root.Values.metrics.workerPort }}
{{- if and $server (ge (float64 $root.Values.server.graceS) (float64 $v.terminationGracePeriodSeconds)) }}
{{- fail (printf "server.graceS must be below services.%s.terminationGracePeriodSeconds" .name) }}
{{- end }}
{{- if and (not $server) (ge (float64 $v.softShutdownS) (float64 $v.terminationGracePeriodSeconds)) }}
{{- fail (printf "services.%s.softShutdownS must be below its terminationGracePeriodSeconds" .name) }}
{{- end }}
{{- if and (not $server) (gt (int $v.concurrency) 1) }}
{{- fail (printf "services.%s.concurrency must be 1 (one pool process per pod serves the probed metrics endpoint); scale with replicas or autoscaling" .name) }}
{{- end }}
{{- $probePort := .grpcPort }}
{{- if $tls }}{{ $probePort = $root.Values.tls.healthPort }}{{ end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "personalkv.fullname" $root }}-{{ .name }}
  {{- include "personalkv.namespace" $root | nindent 2 }}
  labels:
    {{- include "personalkv.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .name }}
  annotations:
    # Justified in deploy/README.md ("checkov"): settings are read from the environment only.
    checkov.io/skip1: CKV_K8S_35=PersonalKV reads settings from env; secretKeyRef keeps the values out of the manifest
spec:
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  progressDeadlineSeconds: {{ $v.progressDeadlineSeconds }}
  {{- with $v.strategy }}
  strategy:
    {{- /* Values merge over the defaults: Recreate must not keep the default rollingUpdate. */}}
    {{- toYaml (eq .type "Recreate" | ternary (omit . "rollingUpdate") .) | nindent 4 }}
  {{- end }}
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
      {{- include "personalkv.podCommon" $root | nindent 6 }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      {{- with $v.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $v.runtimeClassName }}
      runtimeClassName: {{ . }}
      {{- end }}
      {{- if or (and $loadsModel $root.Values.modelCache.prefetch.enabled) $root.Values.initContainers }}
      initContainers:
        {{- if and $loadsModel $root.Values.modelCache.prefetch.enabled }}
        # Downloads the weights (model.revision) into the cache volume, so that the main
        # container's startup probe times only the model load; skips smollm2, tiny:* models and
        # local paths. It reaches the hub whatever model.hfOffline says (that is the main
        # container's switch).
        - name: prefetch-weights
          image: {{ include "personalkv.image" (dict "root" $root "gpu" $gpu) | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["python", "-c"]
          args:
            - |
              import os
              from huggingface_hub import snapshot_download
              name = os.environ["PERSONALKV_MODEL_NAME"]
              revision = os.environ.get("PERSONALKV_MODEL_REVISION") or None
              if not (name.startswith("tiny:") or name == "smollm2" or os.path.exists(name)):
                  print("cached at", snapshot_download(name, revision=revision))
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          envFrom:
            - configMapRef:
                name: {{ include "personalkv.fullname" $root }}
          env:
            - name: HF_HOME
              value: {{ $root.Values.modelCache.mountPath | quote }}
            {{- with $root.Values.secrets.hfToken }}
            {{- if .name }}
            - name: HF_TOKEN
              valueFrom: {secretKeyRef: {name: {{ .name | quote }}, key: {{ .key | quote }}}}
            {{- end }}
            {{- end }}
          resources:
            {{- toYaml $root.Values.modelCache.prefetch.resources | nindent 12 }}
          volumeMounts:
            {{- include "personalkv.scratchMounts" $root | nindent 12 }}
            - {name: model-cache, mountPath: {{ $root.Values.modelCache.mountPath }}}
        {{- end }}
        {{- with $root.Values.initContainers }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      containers:
        - name: {{ .name }}
          image: {{ include "personalkv.image" (dict "root" $root "gpu" $gpu) | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["personalkv"]
          {{- $args := .args }}
          {{- if not $server }}
          {{- $args = concat $args (list "--metrics-port" ($metricsPort | toString)) }}
          {{- end }}
          args: {{ toJson $args }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          envFrom:
            - configMapRef:
                name: {{ include "personalkv.fullname" $root }}
            {{- with $root.Values.extraEnvFrom }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          env:
            {{- with include "personalkv.secretEnv" (dict "root" $root "server" $server "gpu" $loadsModel) }}{{ . | trim | nindent 12 }}{{- end }}
            {{- with include "personalkv.noStaticS3Keys" $root }}{{ . | trim | nindent 12 }}{{- end }}
            {{- if $loadsModel }}
            - name: HF_HOME
              value: {{ $root.Values.modelCache.mountPath | quote }}
            {{- end }}
            {{- if not $server }}
            - name: PERSONALKV_CELERY_SOFT_SHUTDOWN_TIMEOUT_S
              value: {{ $v.softShutdownS | toString | quote }}
            {{- end }}
            {{- if $tls }}
            - {name: PERSONALKV_SERVER_TLS_CERT_FILE, value: /etc/personalkv/tls/tls.crt}
            - {name: PERSONALKV_SERVER_TLS_KEY_FILE, value: /etc/personalkv/tls/tls.key}
            - name: PERSONALKV_SERVER_HEALTH_PORT
              value: {{ $root.Values.tls.healthPort | toString | quote }}
            {{- end }}
            {{- with $root.Values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            {{- if $server }}
            - {name: grpc, containerPort: {{ .grpcPort }}, protocol: TCP}
            {{- if $tls }}
            - {name: health, containerPort: {{ $root.Values.tls.healthPort }}, protocol: TCP}
            {{- end }}
            {{- end }}
            - {name: metrics, containerPort: {{ $metricsPort }}, protocol: TCP}
          {{- if $server }}
          # Native gRPC probes against grpc.health.v1 (on the plaintext health-only port when
          # the API port speaks TLS): SERVING once ready (answering: after the model loaded),
          # NOT_SERVING on SIGTERM.
          startupProbe:
            grpc: {port: {{ $probePort }}, service: {{ .healthService }}}
            periodSeconds: {{ $v.probes.periodSeconds }}
            failureThreshold: {{ $v.probes.startupFailureThreshold }}
          readinessProbe:
            grpc: {port: {{ $probePort }}, service: {{ .healthService }}}
            periodSeconds: {{ $v.probes.periodSeconds }}
            failureThreshold: 2
          livenessProbe:
            grpc: {port: {{ $probePort }}}
            periodSeconds: {{ $v.probes.periodSeconds }}
            timeoutSeconds: 5
            failureThreshold: 6
          {{- else }}
          # The worker's pool process serves /metrics: it answers while the process that runs
          # the tasks is alive (Celery restarts a crashed pool process; a hung one stops answering).
          startupProbe:
            httpGet: {path: /metrics, port: metrics}
            periodSeconds: {{ $v.probes.periodSeconds }}
            failureThreshold: {{ $v.probes.startupFailureThreshold }}
          readinessProbe:
            httpGet: {path: /metrics, port: metrics}
            periodSeconds: {{ $v.probes.periodSeconds }}
            timeoutSeconds: 5
          livenessProbe:
            httpGet: {path: /metrics, port: metrics}
            periodSeconds: {{ $v.probes.periodSeconds }}
            timeoutSeconds: 10
            failureThreshold: 6
          {{- end }}
          resources:
            {{- $res := deepCopy ($v.resources | default dict) }}
            {{- if $gpu }}
            {{- $limits := merge (dict $v.gpu.resourceName $v.gpu.count) ($res.limits | default dict) }}
            {{- $_ := set $res "limits" $limits }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          volumeMounts:
            {{- include "personalkv.scratchMounts" $root | nindent 12 }}
            {{- if $loadsModel }}
            - {name: model-cache, mountPath: {{ $root.Values.modelCache.mountPath }}}
            {{- end }}
            {{- if $tls }}
            - {name: tls, mountPath: /etc/personalkv/tls, readOnly: true}
            {{- end }}
            {{- with $root.Values.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        {{- include "personalkv.scratchVolumes" $root | nindent 8 }}
        {{- if $loadsModel }}
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
        {{- if $tls }}
        - name: tls
          secret:
            secretName: {{ include "personalkv.tlsSecretName" $root }}
            defaultMode: 0440
        {{- end }}
        {{- with $root.Values.extraVolumes }}
        {{- toYaml . | nindent 8 }}
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
      {{- with $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- range . }}
        {{- $c := deepCopy . }}
        {{- if not (hasKey $c "labelSelector") }}
        {{- $_ := set $c "labelSelector" (dict "matchLabels" (include "personalkv.selectorLabels" (dict "root" $root "component" $.name) | fromYaml)) }}
        {{- end }}
        - {{- toYaml $c | nindent 10 }}
        {{- end }}
      {{- end }}
{{- end }}
