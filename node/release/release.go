// Package release decides, when the agent stops, whether tunmesh is being
// uninstalled or the agent only replaced. Uninstalled: the agent releases
// every pod from the mesh (tm0, its routes and rules, the state files), so
// the pods fall back to the primary CNI's path and keep talking, in
// plaintext, without a restart. Replaced (a rollout, a deleted agent pod,
// a node shutting down): the pods stay attached, their tm0 persistent, and
// fail closed until the next agent re-attaches them.
//
// The question is the CNI installer's (cni/install/keep: own pod ->
// controlling DaemonSet -> deleted or being deleted?), with the opposite
// default: the installer uninstalls when it cannot tell, the agent KEEPS
// the pods attached, because releasing them on a guess would send meshed
// traffic in clear.
//
// Uninstall deletes the agent's ServiceAccount and RBAC right after its
// DaemonSet, so at SIGTERM the agent's token may already be refused. The
// Watcher therefore watches its DaemonSet while the agent runs: a deletion
// the API reported on that watch is a fact, not a guess, and counts even
// when the live read at exit fails.
package release

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/tunmesh/tunmesh/identity/rbac"
)

// Mode is the agent's --release-on-exit setting.
type Mode string

const (
	// Never keeps pods attached whenever the agent stops (the default:
	// agents run by something other than a DaemonSet, such as the local
	// stand-in cluster's supervisor).
	Never Mode = "never"
	// DaemonSetDeleted releases the pods when the agent's DaemonSet is
	// deleted or being deleted, and only when the API says so.
	DaemonSetDeleted Mode = "daemonset-deleted"
)

// ErrBadMode is returned by ParseMode for an unknown mode.
var ErrBadMode = errors.New("unknown release mode")

// ParseMode parses a --release-on-exit value.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case Never, DaemonSetDeleted:
		return m, nil
	}
	return "", fmt.Errorf("%w %q (want %q or %q)", ErrBadMode, s, Never, DaemonSetDeleted)
}

// RequiredPermissions are the API calls the Watcher makes for an agent pod
// in namespace: its own pod, and its DaemonSet (read at exit, and watched).
func RequiredPermissions(namespace string) []rbac.Permission {
	return []rbac.Permission{
		{Resource: "pods", Verb: "get", Namespace: namespace},
		{Group: "apps", Resource: "daemonsets", Verb: "get", Namespace: namespace},
		{Group: "apps", Resource: "daemonsets", Verb: "list", Namespace: namespace},
		{Group: "apps", Resource: "daemonsets", Verb: "watch", Namespace: namespace},
	}
}

// State is what one source says of the agent's DaemonSet.
type State int

const (
	Unknown  State = iota // could not tell (API error, not synced, no DaemonSet owner)
	Exists                // there: the agent is being replaced
	Deleting              // has a deletion timestamp: uninstall
	Deleted               // gone: uninstall
)

func (s State) String() string {
	switch s {
	case Exists:
		return "exists"
	case Deleting:
		return "being deleted"
	case Deleted:
		return "deleted"
	}
	return "unknown"
}

// Observation is a State and what it rests on, for the log.
type Observation struct {
	State State
	Why   string
}

// Decide tells whether to release the pods, from a live read of the
// DaemonSet at exit and from what the watch saw last. The live read wins
// when it answers (a DaemonSet that exists now, even a re-created one,
// means an agent will take over); when it cannot, a deletion the watch
// saw still counts. Anything else keeps the pods: fail closed.
func Decide(live, watched Observation) (release bool, why string) {
	switch live.State {
	case Deleting, Deleted:
		return true, "live read: " + live.Why
	case Exists:
		return false, "live read: " + live.Why
	}
	switch watched.State {
	case Deleting, Deleted:
		return true, "watch: " + watched.Why + " (live read failed: " + live.Why + ")"
	}
	return false, "cannot tell, keeping pods attached: live read: " + live.Why + "; watch: " + watched.Why
}

// Watcher follows the agent pod's DaemonSet. New starts nothing; Run
// finds the DaemonSet and watches it until ctx ends; Decide may be called
// after Run has returned.
type Watcher struct {
	client    kubernetes.Interface
	namespace string
	pod       string
	log       *slog.Logger
	// ExitTimeout bounds Decide's live reads (default 5s).
	ExitTimeout time.Duration
	// Settle is how long Decide waits, when the live read fails and the
	// watch has seen no deletion, for the watch to report one (default
	// 2s): at uninstall the DaemonSet's deletion and the agent's SIGTERM
	// come close together.
	Settle time.Duration

	mu      sync.Mutex    // guards the fields below
	owner   string        // the DaemonSet's name, "" until known
	watched Observation   // latest from the watch
	changed chan struct{} // closed and replaced when watched changes
}

// NewWatcher checks its dependencies.
func NewWatcher(client kubernetes.Interface, namespace, pod string, log *slog.Logger) (*Watcher, error) {
	if client == nil || log == nil {
		return nil, errors.New("release watcher: nil dependency")
	}
	if namespace == "" || pod == "" {
		return nil, errors.New("release watcher: the agent's pod name and namespace are required (--pod-name, --pod-namespace)")
	}
	return &Watcher{client: client, namespace: namespace, pod: pod, log: log, ExitTimeout: 5 * time.Second, Settle: 2 * time.Second,
		watched: Observation{Unknown, "not watched yet"}, changed: make(chan struct{})}, nil
}

func (w *Watcher) observe(o Observation) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if o == w.watched {
		return
	}
	w.watched = o
	close(w.changed)
	w.changed = make(chan struct{})
}

func (w *Watcher) snapshot() (owner string, watched Observation, changed <-chan struct{}) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.owner, w.watched, w.changed
}

// ownerOf reads the agent's own pod and returns its controlling DaemonSet.
func (w *Watcher) ownerOf(ctx context.Context) (string, error) {
	p, err := w.client.CoreV1().Pods(w.namespace).Get(ctx, w.pod, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("read own pod %s/%s: %w", w.namespace, w.pod, err)
	}
	ref := metav1.GetControllerOf(p)
	if ref == nil || ref.Kind != "DaemonSet" {
		return "", fmt.Errorf("pod %s/%s is not run by a DaemonSet", w.namespace, w.pod)
	}
	return ref.Name, nil
}

// Run finds the agent's DaemonSet (retrying while the API is unreachable)
// and watches it until ctx ends. It returns nil: a watcher that cannot
// find its DaemonSet only leaves the exit decision at "cannot tell".
func (w *Watcher) Run(ctx context.Context) error {
	var name string
	for backoff := time.Second; ; backoff = min(2*backoff, 30*time.Second) {
		var err error
		name, err = w.ownerOf(ctx)
		if err == nil {
			break
		}
		w.observe(Observation{Unknown, err.Error()})
		w.log.Warn("release on exit: cannot find the agent's DaemonSet yet; pods stay attached at exit until it is found", "err", err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
	}
	w.mu.Lock()
	w.owner = name
	w.mu.Unlock()
	f := informers.NewSharedInformerFactoryWithOptions(w.client, 0, informers.WithNamespace(w.namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
		}))
	inf := f.Apps().V1().DaemonSets().Informer()
	onDS := func(obj any) {
		ds, ok := obj.(*appsv1.DaemonSet)
		if !ok || ds.Name != name {
			return
		}
		if ds.DeletionTimestamp != nil {
			w.observe(Observation{Deleting, fmt.Sprintf("DaemonSet %s/%s is being deleted", w.namespace, name)})
			return
		}
		w.observe(Observation{Exists, fmt.Sprintf("DaemonSet %s/%s exists", w.namespace, name)})
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    onDS,
		UpdateFunc: func(_, n any) { onDS(n) },
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			if ds, ok := obj.(*appsv1.DaemonSet); ok && ds.Name == name {
				w.observe(Observation{Deleted, fmt.Sprintf("DaemonSet %s/%s deleted", w.namespace, name)})
			}
		},
	}); err != nil {
		return fmt.Errorf("release watcher: %w", err)
	}
	f.Start(ctx.Done())
	defer f.Shutdown()
	if cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		// Listed, and not there: deleted before this agent started.
		if _, exists, err := inf.GetStore().GetByKey(w.namespace + "/" + name); err == nil && !exists {
			w.observe(Observation{Deleted, fmt.Sprintf("DaemonSet %s/%s not found", w.namespace, name)})
		}
	}
	<-ctx.Done()
	return nil
}

// live reads the DaemonSet now (finding it from the own pod first if Run
// did not).
func (w *Watcher) live(ctx context.Context, owner string) Observation {
	if owner == "" {
		var err error
		if owner, err = w.ownerOf(ctx); err != nil {
			return Observation{Unknown, err.Error()}
		}
	}
	ds, err := w.client.AppsV1().DaemonSets(w.namespace).Get(ctx, owner, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return Observation{Deleted, fmt.Sprintf("DaemonSet %s/%s deleted", w.namespace, owner)}
	case err != nil:
		return Observation{Unknown, fmt.Sprintf("read DaemonSet %s/%s: %v", w.namespace, owner, err)}
	case ds.DeletionTimestamp != nil:
		return Observation{Deleting, fmt.Sprintf("DaemonSet %s/%s is being deleted", w.namespace, owner)}
	}
	return Observation{Exists, fmt.Sprintf("DaemonSet %s/%s exists (rollout or replaced pod): its next agent re-attaches the pods", w.namespace, owner)}
}

// Decide reads the DaemonSet now and decides (see Decide). When the live
// read fails and the watch has seen no deletion, it gives the watch up to
// Settle to report one. Call it with a live ctx (the agent's has ended by
// then): it bounds its own reads by ExitTimeout.
func (w *Watcher) Decide(ctx context.Context) (release bool, why string) {
	ctx, cancel := context.WithTimeout(ctx, w.ExitTimeout)
	defer cancel()
	owner, _, _ := w.snapshot()
	live := w.live(ctx, owner)
	_, watched, changed := w.snapshot()
	if live.State == Unknown && watched.State != Deleted && watched.State != Deleting {
		t := time.NewTimer(w.Settle)
		defer t.Stop()
		for watched.State != Deleted && watched.State != Deleting {
			select {
			case <-changed:
			case <-t.C:
				return Decide(live, watched)
			case <-ctx.Done():
				return Decide(live, watched)
			}
			_, watched, changed = w.snapshot()
		}
	}
	return Decide(live, watched)
}
