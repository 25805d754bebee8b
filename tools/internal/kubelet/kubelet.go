// Package kubelet is the local cluster's kubelet stand-in. For one node it
// registers the Node object and keeps it Ready (status heartbeats and a
// Lease), and realizes the pods bound to the node: a network namespace per
// pod set up through libcni with the node's own CNI configuration, each
// container's command run as a process inside that namespace, probes run
// from the node's namespace, restart policies, status reporting, and
// teardown on completion or deletion.
//
// It is not a kubelet: images, volumes, resources and the kubelet API are
// ignored (see docs/local-cluster.md for what is and is not realized).
package kubelet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
)

// Config describes the node this kubelet runs.
type Config struct {
	NodeName       string
	Netns          string       // the node's network namespace
	NodeIP         netip.Addr   // the node's underlay address
	PodCIDR        netip.Prefix // spec.podCIDR of the Node
	PodNetnsPrefix string       // pod namespaces are named PodNetnsPrefix + pod UID
	CNIConfDir     string       // the node's /etc/cni/net.d
	CNIBinDirs     []string     // where CNI plugins are found
	CNICacheDir    string       // the node's /var/lib/cni
	StateDir       string       // per-pod directories (working dir, container logs)
	BinDirs        []string     // searched first when resolving container commands
	Version        string       // reported as the kubelet version
	// ServiceHost is the ClusterIP of the "kubernetes" Service, given to
	// containers as KUBERNETES_SERVICE_HOST.
	ServiceHost string
	// HeartbeatInterval is how often node status and lease are renewed;
	// zero means 10s.
	HeartbeatInterval time.Duration
}

func (c Config) validate() error {
	switch {
	case c.NodeName == "":
		return errors.New("kubelet config: empty node name")
	case c.Netns == "":
		return errors.New("kubelet config: empty node netns")
	case !c.NodeIP.IsValid():
		return errors.New("kubelet config: no node IP")
	case !c.PodCIDR.IsValid():
		return errors.New("kubelet config: no pod CIDR")
	case c.PodNetnsPrefix == "" || c.CNIConfDir == "" || c.CNICacheDir == "" || c.StateDir == "":
		return errors.New("kubelet config: pod netns prefix, CNI conf/cache dirs and state dir are required")
	case len(c.CNIBinDirs) == 0:
		return errors.New("kubelet config: no CNI bin dir")
	}
	return nil
}

// Kubelet runs one node. New starts nothing; Run blocks until ctx ends.
type Kubelet struct {
	cfg      Config
	client   kubernetes.Interface
	log      *slog.Logger
	recorder record.EventRecorder
	cni      *cniRuntime

	mu      sync.Mutex
	workers map[types.UID]*podWorker
	wg      sync.WaitGroup // one per worker goroutine
}

// New checks the configuration and dependencies.
func New(cfg Config, client kubernetes.Interface, log *slog.Logger) (*Kubelet, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if client == nil {
		return nil, errors.New("kubelet: nil client")
	}
	if log == nil {
		return nil, errors.New("kubelet: nil logger")
	}
	if cfg.HeartbeatInterval == 0 {
		cfg.HeartbeatInterval = 10 * time.Second
	}
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return nil, fmt.Errorf("create kubelet state dir: %w", err)
	}
	return &Kubelet{
		cfg:     cfg,
		client:  client,
		log:     log.With("node", cfg.NodeName),
		cni:     newCNIRuntime(cfg),
		workers: make(map[types.UID]*podWorker),
	}, nil
}

// Run registers the node, keeps it Ready and realizes its pods until ctx
// ends; then it stops every pod's containers and tears down their
// namespaces (the node is going away) and returns.
func (k *Kubelet) Run(ctx context.Context) error {
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: k.client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	k.recorder = broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "kubelet", Host: k.cfg.NodeName})

	if err := k.register(ctx); err != nil {
		return err
	}
	hbDone := make(chan struct{})
	go func() { // RoutineHeartbeat: owned by Run, ends with ctx
		defer close(hbDone)
		k.heartbeat(ctx)
	}()

	factory := informers.NewSharedInformerFactoryWithOptions(k.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", k.cfg.NodeName).String()
		}))
	inf := factory.Core().V1().Pods().Informer()
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { k.observe(ctx, obj, false) },
		UpdateFunc: func(_, obj any) { k.observe(ctx, obj, false) },
		DeleteFunc: func(obj any) { k.observe(ctx, obj, true) },
	}); err != nil {
		return fmt.Errorf("watch pods of node %s: %w", k.cfg.NodeName, err)
	}
	factory.Start(ctx.Done())
	k.log.Info("kubelet running", "pod_cidr", k.cfg.PodCIDR.String())
	<-ctx.Done()
	factory.Shutdown()
	k.wg.Wait() // workers stop their pods when ctx ends
	<-hbDone
	return nil
}

// observe hands the latest view of a pod to its worker, starting one for a
// pod seen the first time.
func (k *Kubelet) observe(ctx context.Context, obj any, deleted bool) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj, deleted = d.Obj, true
	}
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	w := k.workers[pod.UID]
	if w == nil {
		if deleted || ctx.Err() != nil {
			return
		}
		w = newPodWorker(k, pod)
		k.workers[pod.UID] = w
		k.wg.Add(1)
		go func() { // RoutinePodWorker: owned by the Kubelet, ends when the pod is gone or ctx ends
			defer k.wg.Done()
			w.run(ctx)
			k.mu.Lock()
			delete(k.workers, pod.UID)
			k.mu.Unlock()
		}()
	}
	w.update(pod, deleted)
}
