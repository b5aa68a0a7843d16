{{/*
Names, labels and the shared pieces of every role's workload.

Most helpers take a dict: (dict "root" $ "role" "policy"), where role is a
role slug (policy, reward, reference, learner, coordinator); chart-wide
objects pass no role.
*/}}

{{- define "alignd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The release prefix of every name, cut to 40 characters so that the longest
derived name (<fullname>-reference-headless) stays a valid 63-character DNS
label.
*/}}
{{- define "alignd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "alignd.roles" -}}policy reward reference learner coordinator{{- end -}}

{{- define "alignd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <fullname>-<role>: the workload, its ConfigMap prefix and its client Service. */}}
{{- define "alignd.componentName" -}}
{{- printf "%s-%s" (include "alignd.fullname" .root) .role -}}
{{- end -}}

{{/* The headless Service of a role (every replica's address; the learner's rendezvous). */}}
{{- define "alignd.headlessName" -}}
{{- printf "%s-headless" (include "alignd.componentName" .) -}}
{{- end -}}

{{- define "alignd.svcSuffix" -}}
{{- printf "%s.svc.%s" .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* host:port of a role for other roles: its headless Service (policy, reward, reference) or its Service. */}}
{{- define "alignd.headlessAddress" -}}
{{- $v := index .root.Values .role -}}
{{- printf "%s.%s:%d" (include "alignd.headlessName" .) (include "alignd.svcSuffix" .) (int $v.ports.grpc) -}}
{{- end -}}

{{- define "alignd.serviceAddress" -}}
{{- $v := index .root.Values .role -}}
{{- printf "%s.%s:%d" (include "alignd.componentName" .) (include "alignd.svcSuffix" .) (int $v.ports.grpc) -}}
{{- end -}}

{{- define "alignd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "alignd.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .role }}
app.kubernetes.io/component: {{ .role }}
{{- end }}
{{- end -}}

{{- define "alignd.labels" -}}
helm.sh/chart: {{ include "alignd.chart" .root }}
{{ include "alignd.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: alignd
{{- end -}}

{{- define "alignd.coordinatorServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-coordinator" (include "alignd.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The kubernetes.io/tls Secret of a role (values `tls`). */}}
{{- define "alignd.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "alignd.componentName" .)) (get .root.Values.tls.secretNames .role) -}}
{{- end -}}

{{/* The name every role's certificate carries and every role verifies its peers by (they dial pod IPs). */}}
{{- define "alignd.tlsPeerName" -}}
{{- printf "%s-peers.%s.svc" (include "alignd.fullname" .root) .root.Release.Namespace -}}
{{- end -}}

{{/* The DNS names of a role's certificate, as a YAML list. */}}
{{- define "alignd.tlsDNSNames" -}}
{{- $name := include "alignd.componentName" . -}}
{{- $ns := .root.Release.Namespace -}}
{{- $domain := .root.Values.clusterDomain -}}
- {{ include "alignd.tlsPeerName" . }}
{{- range $svc := list $name (printf "%s-headless" $name) }}
- {{ $svc }}
- {{ $svc }}.{{ $ns }}.svc
- {{ $svc }}.{{ $ns }}.svc.{{ $domain }}
{{- end }}
{{- end -}}

{{- define "alignd.authSecretName" -}}
{{- default (printf "%s-auth" (include "alignd.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The chart's own callers and their scopes (alignd.runtime.scopes; docs/security.md), as YAML. */}}
{{- define "alignd.authCallers" -}}
coordinator: [generate, score, logprobs, train, weights]
learner: [weights]
operator: [admin]
{{- if .Values.metrics.auth }}
prometheus: [metrics]
{{- end }}
{{- end -}}

{{- define "alignd.pvcName" -}}
{{- default (printf "%s-data" (include "alignd.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{- define "alignd.image" -}}
{{- $v := index .root.Values .role -}}
{{- printf "%s:%s" $v.image.repository (default .root.Chart.AppVersion $v.image.tag) -}}
{{- end -}}

{{/* GPUs per pod of a role: its nvidia.com/gpu limit (or request), else 0. */}}
{{- define "alignd.gpus" -}}
{{- $v := index .root.Values .role -}}
{{- $res := $v.resources | default dict -}}
{{- $lim := $res.limits | default dict -}}
{{- $req := $res.requests | default dict -}}
{{- index $lim "nvidia.com/gpu" | default (index $req "nvidia.com/gpu") | default 0 | int -}}
{{- end -}}

{{/* The learner's processes per pod under torchrun: its GPUs, at least 1. */}}
{{- define "alignd.learnerProcsPerPod" -}}
{{- max 1 (int (include "alignd.gpus" (dict "root" .root "role" "learner"))) -}}
{{- end -}}

{{- define "alignd.learnerWorldSize" -}}
{{- mul (int .root.Values.learner.replicas) (int (include "alignd.learnerProcsPerPod" .)) -}}
{{- end -}}

{{- define "alignd.learnerMasterAddr" -}}
{{- $r := dict "root" .root "role" "learner" -}}
{{- printf "%s-0.%s.%s" (include "alignd.componentName" $r) (include "alignd.headlessName" $r) (include "alignd.svcSuffix" $r) -}}
{{- end -}}

{{/*
The role's configuration file: the user's `config`, with server.* set from
`ports` (bound on all interfaces) and, where the config leaves them empty,
the addresses of the other roles and the paths on the shared volume.
*/}}
{{- define "alignd.roleConfig" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $v := index $root.Values $role -}}
{{- $cfg := deepCopy ($v.config | default dict) -}}
{{- $server := deepCopy (get $cfg "server" | default dict) -}}
{{- $_ := set $server "host" "0.0.0.0" -}}
{{- $_ := set $server "port" (int $v.ports.grpc) -}}
{{- $_ := set $server "metrics_host" "0.0.0.0" -}}
{{- $_ := set $server "metrics_port" (int $v.ports.metrics) -}}
{{- /* Credentials: every role checks calls against the mounted tokens.yaml; open only with auth.enabled false. */ -}}
{{- $auth := deepCopy (get $server "auth" | default dict) -}}
{{- if $root.Values.auth.enabled -}}
{{- $_ := set $auth "tokens_file" (printf "%s/tokens.yaml" $root.Values.auth.mountPath) -}}
{{- if and (eq $role "reward") $root.Values.auth.trustedNetworks (not (get $auth "trusted_networks")) -}}
{{- $_ := set $auth "trusted_networks" $root.Values.auth.trustedNetworks -}}
{{- end -}}
{{- if $root.Values.metrics.auth -}}
{{- $_ := set $auth "metrics_requires_token" true -}}
{{- end -}}
{{- else -}}
{{- $_ := set $auth "enabled" false -}}
{{- end -}}
{{- $_ := set $server "auth" $auth -}}
{{- /* Paths in requests stay on the shared volume and the cache (alignd.runtime.paths). */ -}}
{{- $paths := deepCopy (get $cfg "paths" | default dict) -}}
{{- if not (get $paths "roots") -}}
{{- $_ := set $paths "roots" (list $root.Values.persistence.mountPath "/var/cache/alignd") -}}
{{- end -}}
{{- $_ := set $cfg "paths" $paths -}}
{{- /* The coordinator and the learner send their own token (mounted as `token`). */ -}}
{{- if and $root.Values.auth.enabled (or (eq $role "coordinator") (eq $role "learner")) -}}
{{- $client := deepCopy (get $cfg "client" | default dict) -}}
{{- if not (get $client "tokens_file") -}}
{{- $_ := set $client "tokens_file" (printf "%s/token" $root.Values.auth.mountPath) -}}
{{- end -}}
{{- $_ := set $cfg "client" $client -}}
{{- end -}}
{{- if and $root.Values.tls.enabled $root.Values.rewardTLS.enabled -}}
{{- fail "tls and rewardTLS: enable one (tls covers the reward role too)" -}}
{{- end -}}
{{- if $root.Values.tls.enabled -}}
{{- /* Mutual TLS between all roles: the role's own certificate; the CA of its peers; the plaintext health port. */ -}}
{{- $tlsDir := $root.Values.tls.mountPath -}}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" $tlsDir) "key_file" (printf "%s/tls.key" $tlsDir) -}}
{{- if $root.Values.tls.mutual -}}
{{- $_ := set $tls "client_ca_file" (printf "%s/ca.crt" $tlsDir) -}}
{{- end -}}
{{- $_ := set $server "tls" $tls -}}
{{- $_ := set $server "health_port" (int $root.Values.tls.healthPort) -}}
{{- if or (eq $role "coordinator") (eq $role "learner") -}}
{{- $client := deepCopy (get $cfg "client" | default dict) -}}
{{- $_ := set $client "ca_file" (printf "%s/ca.crt" $tlsDir) -}}
{{- $_ := set $client "server_name" (include "alignd.tlsPeerName" .) -}}
{{- if $root.Values.tls.mutual -}}
{{- $_ := set $client "cert_file" (printf "%s/tls.crt" $tlsDir) -}}
{{- $_ := set $client "key_file" (printf "%s/tls.key" $tlsDir) -}}
{{- end -}}
{{- $_ := set $cfg "client" $client -}}
{{- end -}}
{{- end -}}
{{- if and (eq $role "reward") $root.Values.rewardTLS.enabled -}}
{{- /* The mounted kubernetes.io/tls Secret; with mutual, the client CA's ca.crt. */ -}}
{{- $tlsDir := $root.Values.rewardTLS.mountPath -}}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" $tlsDir) "key_file" (printf "%s/tls.key" $tlsDir) -}}
{{- if $root.Values.rewardTLS.mutual -}}
{{- $_ := set $tls "client_ca_file" (printf "%s-client-ca/ca.crt" $tlsDir) -}}
{{- end -}}
{{- $_ := set $server "tls" $tls -}}
{{- end -}}
{{- $_ := set $cfg "server" $server -}}
{{- if eq $role "reward" -}}
{{- $http := deepCopy (get $cfg "http" | default dict) -}}
{{- $_ := set $http "host" "0.0.0.0" -}}
{{- $_ := set $http "port" (int $v.ports.http) -}}
{{- $_ := set $cfg "http" $http -}}
{{- end -}}
{{- $mount := $root.Values.persistence.mountPath -}}
{{- if eq $role "coordinator" -}}
{{- range $other := list "policy" "reward" "reference" -}}
{{- $key := printf "%s_addresses" $other -}}
{{- if and (index $root.Values $other).enabled (not (get $cfg $key)) -}}
{{- $_ := set $cfg $key (list (include "alignd.headlessAddress" (dict "root" $root "role" $other))) -}}
{{- end -}}
{{- end -}}
{{- if and $root.Values.learner.enabled (not (get $cfg "learner_address")) -}}
{{- $_ := set $cfg "learner_address" (include "alignd.serviceAddress" (dict "root" $root "role" "learner")) -}}
{{- end -}}
{{- if not (get $cfg "runs_dir") -}}
{{- $_ := set $cfg "runs_dir" (printf "%s/runs" $mount) -}}
{{- end -}}
{{- /* Credentials for the reward replicas with rewardTLS: the coordinator's token, the reward CA. */ -}}
{{- $rc := deepCopy (get $cfg "reward_client" | default dict) -}}
{{- if and $root.Values.rewardTLS.enabled $root.Values.auth.enabled (not (get $rc "tokens_file")) -}}
{{- $_ := set $rc "tokens_file" (printf "%s/token" $root.Values.auth.mountPath) -}}
{{- end -}}
{{- if $root.Values.rewardTLS.enabled -}}
{{- $tlsDir := $root.Values.rewardTLS.mountPath -}}
{{- $_ := set $rc "ca_file" (printf "%s/ca.crt" $tlsDir) -}}
{{- $_ := set $rc "server_name" (default (printf "%s.%s" (include "alignd.headlessName" (dict "root" $root "role" "reward")) (include "alignd.svcSuffix" (dict "root" $root))) $root.Values.rewardTLS.serverName) -}}
{{- if $root.Values.rewardTLS.mutual -}}
{{- $_ := set $rc "cert_file" (printf "%s-client/tls.crt" $tlsDir) -}}
{{- $_ := set $rc "key_file" (printf "%s-client/tls.key" $tlsDir) -}}
{{- end -}}
{{- end -}}
{{- if $rc -}}
{{- $_ := set $cfg "reward_client" $rc -}}
{{- end -}}
{{- /* Kubernetes RM jobs (launcher.kind: kubernetes): the learner's image, the shared volume, this namespace. */ -}}
{{- $launcher := deepCopy (get $cfg "launcher" | default dict) -}}
{{- $k8s := deepCopy (get $launcher "kubernetes" | default dict) -}}
{{- if not (get $k8s "image") -}}
{{- $_ := set $k8s "image" (include "alignd.image" (dict "root" $root "role" "learner")) -}}
{{- end -}}
{{- if and $root.Values.persistence.enabled (not (get $k8s "pvc_claim")) -}}
{{- $_ := set $k8s "pvc_claim" (include "alignd.pvcName" $root) -}}
{{- end -}}
{{- if not (get $k8s "run_mount_path") -}}
{{- $_ := set $k8s "run_mount_path" $mount -}}
{{- end -}}
{{- if not (get $k8s "namespace") -}}
{{- $_ := set $k8s "namespace" $root.Release.Namespace -}}
{{- end -}}
{{- $_ := set $launcher "kubernetes" $k8s -}}
{{- $_ := set $cfg "launcher" $launcher -}}
{{- else if eq $role "learner" -}}
{{- if and $root.Values.policy.enabled (not (get $cfg "policy_addresses")) -}}
{{- $_ := set $cfg "policy_addresses" (list (include "alignd.headlessAddress" (dict "root" $root "role" "policy"))) -}}
{{- end -}}
{{- if not (get $cfg "checkpoint_dir") -}}
{{- $_ := set $cfg "checkpoint_dir" (printf "%s/learner/checkpoints" $mount) -}}
{{- end -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Probe timing: a probe block of values plus the native gRPC check on the role's port, or (a reward role
with TLS: kubelet's gRPC probes speak no TLS) HTTPS GET /health on its http port. */}}
{{- define "alignd.probe" -}}
{{- if .https }}
httpGet:
  path: /health
  port: {{ .https }}
  scheme: HTTPS
{{- else }}
grpc:
  port: {{ .port }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end -}}

{{/*
The pod template of a role (Deployment or StatefulSet).
*/}}
{{- define "alignd.podTemplate" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $v := index $root.Values $role -}}
{{- $ctx := dict "root" $root "role" $role -}}
{{- $mount := $root.Values.persistence.mountPath -}}
{{- $torchrun := and (eq $role "learner") (gt (int (include "alignd.learnerWorldSize" $ctx)) 1) -}}
{{- $authOn := $root.Values.auth.enabled -}}
{{- /* The coordinator and the learner call other roles: they mount their own token too. */ -}}
{{- $ownToken := and $authOn (or (eq $role "coordinator") (eq $role "learner")) -}}
{{- $rewardTLS := and (or (eq $role "reward") (eq $role "coordinator")) $root.Values.rewardTLS.enabled -}}
{{- $httpsProbe := "" -}}
{{- $probePort := $v.ports.grpc -}}
{{- if $root.Values.tls.enabled -}}
{{- $probePort = $root.Values.tls.healthPort -}}
{{- end -}}
{{- if and (eq $role "reward") $root.Values.rewardTLS.enabled -}}
{{- $httpsProbe = $v.ports.http -}}
{{- end -}}
metadata:
  labels:
    {{- include "alignd.selectorLabels" $ctx | nindent 4 }}
    app.kubernetes.io/part-of: alignd
    {{- include "alignd.kueueLabel" $ctx | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "alignd.roleConfig" $ctx | sha256sum }}
    {{- if $authOn }}
    checksum/auth-extra-tokens: {{ toYaml $root.Values.auth.extraTokens | sha256sum }}
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- if eq $role "coordinator" }}
  serviceAccountName: {{ include "alignd.coordinatorServiceAccountName" $root }}
  automountServiceAccountToken: true
  {{- else }}
  automountServiceAccountToken: false
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  {{- with $v.schedulerName }}
  schedulerName: {{ . | quote }}
  {{- end }}
  {{- with $v.runtimeClassName }}
  runtimeClassName: {{ . | quote }}
  {{- end }}
  {{- with $v.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.initContainers }}
  initContainers:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ $role }}
      image: {{ include "alignd.image" $ctx | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- if $torchrun }}
      command:
        - torchrun
        - --nnodes={{ $v.replicas }}
        - --nproc-per-node={{ include "alignd.learnerProcsPerPod" $ctx }}
        - --node-rank=$(NODE_RANK)
        - --master-addr=$(MASTER_ADDR)
        - --master-port=$(MASTER_PORT)
        - --max-restarts={{ $root.Values.learnerLaunch.maxRestarts }}
        - --module
        - alignd.cli
        - serve
      {{- else }}
      command:
        - alignd
        - serve
      {{- end }}
      args:
        - {{ $role }}
        - --config
        - /etc/alignd/config.yaml
        - --run-dir
        - $(ALIGND_RUN_DIR)
      env:
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        - name: ALIGND_RUN_DIR
          value: {{ printf "%s/logs/%s/$(POD_NAME)" $mount $role | quote }}
        - name: HOME
          value: /tmp
        - name: ALIGND_CACHE
          value: /var/cache/alignd
        - name: HF_HOME
          value: /var/cache/alignd/huggingface
        - name: TORCH_EXTENSIONS_DIR
          value: /var/cache/alignd/torch_extensions
        - name: PYTHONUNBUFFERED
          value: "1"
        {{- if $torchrun }}
        - name: NODE_RANK
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
        - name: MASTER_ADDR
          value: {{ include "alignd.learnerMasterAddr" $ctx | quote }}
        - name: MASTER_PORT
          value: {{ $root.Values.learnerLaunch.masterPort | quote }}
        {{- end }}
        {{- with $v.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ $v.ports.grpc }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $v.ports.metrics }}
          protocol: TCP
        {{- if eq $role "learner" }}
        - name: rendezvous
          containerPort: {{ $root.Values.learnerLaunch.masterPort }}
          protocol: TCP
        {{- end }}
        {{- if eq $role "reward" }}
        - name: http
          containerPort: {{ $v.ports.http }}
          protocol: TCP
        {{- end }}
        {{- if $root.Values.tls.enabled }}
        - name: health
          containerPort: {{ $root.Values.tls.healthPort }}
          protocol: TCP
        {{- end }}
      startupProbe:
        {{- include "alignd.probe" (dict "port" $probePort "https" $httpsProbe "probe" $v.startupProbe) | nindent 8 }}
      livenessProbe:
        {{- include "alignd.probe" (dict "port" $probePort "https" $httpsProbe "probe" $v.livenessProbe) | nindent 8 }}
      readinessProbe:
        {{- include "alignd.probe" (dict "port" $probePort "https" $httpsProbe "probe" $v.readinessProbe) | nindent 8 }}
      {{- with $v.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/alignd
          readOnly: true
        - name: data
          mountPath: {{ $mount }}
        - name: cache
          mountPath: /var/cache/alignd
        - name: tmp
          mountPath: /tmp
        {{- if $v.shmSize }}
        - name: shm
          mountPath: /dev/shm
        {{- end }}
        {{- if $authOn }}
        - name: auth
          mountPath: {{ $root.Values.auth.mountPath }}
          readOnly: true
        {{- end }}
        {{- if $root.Values.tls.enabled }}
        - name: tls
          mountPath: {{ $root.Values.tls.mountPath }}
          readOnly: true
        {{- end }}
        {{- if $rewardTLS }}
        - name: reward-tls
          mountPath: {{ $root.Values.rewardTLS.mountPath }}
          readOnly: true
        {{- if $root.Values.rewardTLS.mutual }}
        {{- if eq $role "reward" }}
        - name: reward-tls-client-ca
          mountPath: {{ printf "%s-client-ca" $root.Values.rewardTLS.mountPath }}
          readOnly: true
        {{- else }}
        - name: reward-tls-client
          mountPath: {{ printf "%s-client" $root.Values.rewardTLS.mountPath }}
          readOnly: true
        {{- end }}
        {{- end }}
        {{- end }}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- with $v.extraContainers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "alignd.componentName" $ctx }}-config
    - name: data
      {{- if $root.Values.persistence.enabled }}
      persistentVolumeClaim:
        claimName: {{ include "alignd.pvcName" $root }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    - name: cache
      emptyDir:
        sizeLimit: {{ $root.Values.cache.sizeLimit }}
    - name: tmp
      emptyDir: {}
    {{- if $v.shmSize }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.shmSize }}
    {{- end }}
    {{- if $rewardTLS }}
    {{- if not $root.Values.rewardTLS.secretName }}
    {{- fail "rewardTLS.enabled: give rewardTLS.secretName (a kubernetes.io/tls Secret with tls.crt, tls.key, ca.crt)" }}
    {{- end }}
    - name: reward-tls
      secret:
        secretName: {{ $root.Values.rewardTLS.secretName }}
        defaultMode: 0440
        {{- if eq $role "coordinator" }}
        items:
          - key: ca.crt
            path: ca.crt
        {{- end }}
    {{- if $root.Values.rewardTLS.mutual }}
    {{- if eq $role "reward" }}
    - name: reward-tls-client-ca
      secret:
        secretName: {{ default $root.Values.rewardTLS.secretName $root.Values.rewardTLS.clientCASecret }}
        defaultMode: 0440
        items:
          - key: ca.crt
            path: ca.crt
    {{- else }}
    {{- if not $root.Values.rewardTLS.coordinatorClientSecret }}
    {{- fail "rewardTLS.mutual: give rewardTLS.coordinatorClientSecret (the coordinator's client certificate)" }}
    {{- end }}
    - name: reward-tls-client
      secret:
        secretName: {{ $root.Values.rewardTLS.coordinatorClientSecret }}
        defaultMode: 0440
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
    {{- end }}
    {{- end }}
    {{- end }}
    {{- if $root.Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ include "alignd.tlsSecretName" $ctx }}
        defaultMode: 0440
    {{- end }}
    {{- if $authOn }}
    - name: auth
      secret:
        secretName: {{ include "alignd.authSecretName" $root }}
        defaultMode: 0440
        items:
          - key: tokens.yaml
            path: tokens.yaml
          {{- if $ownToken }}
          - key: {{ $role }}
            path: token
          {{- end }}
    {{- end }}
    {{- with $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The Kueue queue label of a role's workload and pods (kueue.queueName, for the roles in kueue.roles); "" when
none. */}}
{{- define "alignd.kueueLabel" -}}
{{- $k := .root.Values.kueue -}}
{{- if and $k.queueName (has .role $k.roles) -}}
kueue.x-k8s.io/queue-name: {{ $k.queueName | quote }}
{{- end -}}
{{- end -}}

{{/* A role's Deployment (policy, reward, reference, coordinator). */}}
{{- define "alignd.deployment" -}}
{{- $ctx := dict "root" .root "role" .role -}}
{{- $v := index .root.Values .role -}}
{{- if $v.enabled }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "alignd.componentName" $ctx }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "alignd.labels" $ctx | nindent 4 }}
    {{- include "alignd.kueueLabel" $ctx | nindent 4 }}
spec:
  replicas: {{ $v.replicas }}
  revisionHistoryLimit: 5
  {{- if eq .role "coordinator" }}
  # One coordinator at a time: it owns the run state on the shared volume.
  strategy:
    type: Recreate
  {{- else }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 0
      maxUnavailable: 1
  {{- end }}
  selector:
    matchLabels:
      {{- include "alignd.selectorLabels" $ctx | nindent 6 }}
  template:
    {{- include "alignd.podTemplate" $ctx | nindent 4 }}
{{- end }}
{{- end -}}
