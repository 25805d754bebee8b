package outbound

import (
	"errors"
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/pods"
	"github.com/tunmesh/tunmesh/node/policy"
	"github.com/tunmesh/tunmesh/node/resolve"
)

type fakeLocal map[netstack.NICID]*pods.Pod

func (f fakeLocal) ByNIC(id netstack.NICID) *pods.Pod { return f[id] }

type fakeCluster struct {
	pods  map[netip.Addr]*corev1.Pod
	ns    map[string]*corev1.Namespace
	nsErr error
}

func (f *fakeCluster) PodByAddr(a netip.Addr) (*corev1.Pod, error) { return f.pods[a], nil }
func (f *fakeCluster) Namespace(name string) (*corev1.Namespace, error) {
	if f.nsErr != nil {
		return nil, f.nsErr
	}
	if ns, ok := f.ns[name]; ok {
		return ns, nil
	}
	return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "namespaces"}, name)
}

// fakeServices resolves ClusterIPs to fixed candidates; Pick takes the
// first, so a test sees which candidates the decider offered it.
type fakeServices map[netip.AddrPort][]resolve.Endpoint

func (f fakeServices) Candidates(dst netip.AddrPort) ([]resolve.Endpoint, bool, error) {
	eps, ok := f[dst]
	if !ok {
		return nil, false, nil
	}
	if len(eps) == 0 {
		return nil, true, resolve.ErrNoEndpoints
	}
	return eps, true, nil
}
func (f fakeServices) Pick(eps []resolve.Endpoint) resolve.Endpoint { return eps[0] }

func pod(ns, name, ip, hostIP string, ann map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: ann},
		Spec:       corev1.PodSpec{ServiceAccountName: name + "-sa"},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}, HostIP: hostIP},
	}
}

var (
	clientAddr = netip.MustParseAddr("10.244.1.2")
	meshedIP   = netip.MustParseAddr("10.244.2.3")
	plainIP    = netip.MustParseAddr("10.244.2.4")
	skipIP     = netip.MustParseAddr("10.244.2.5")
	hostNetIP  = netip.MustParseAddr("10.0.0.2")
	otherNSIP  = netip.MustParseAddr("10.244.2.6")
	svcMixed   = netip.MustParseAddrPort("10.96.0.10:80")
	svcMeshed  = netip.MustParseAddrPort("10.96.0.11:80")
	svcPlain   = netip.MustParseAddrPort("10.96.0.12:80")
	svcEmpty   = netip.MustParseAddrPort("10.96.0.13:80")
	svcSkip    = netip.MustParseAddrPort("10.96.0.14:5432")
)

func fixture() (*Decider, *fakeCluster) {
	src := &pods.Pod{Namespace: "prod", Name: "client", Addrs: []netip.Addr{clientAddr}, NIC: 1,
		ID: spiffe.ID{TrustDomain: "cluster.local", Namespace: "prod", ServiceAccount: "client-sa"}}
	srcSkipOut := *src
	srcSkipOut.NIC = 2
	srcSkipOut.Policy.Meshed = true
	var err error
	srcSkipOut.Policy.SkipOutbound, err = policy.ParsePorts("3306")
	if err != nil {
		panic(err)
	}
	hostNet := pod("prod", "hostnet", hostNetIP.String(), "192.168.0.3", nil)
	hostNet.Spec.HostNetwork = true
	c := &fakeCluster{
		pods: map[netip.Addr]*corev1.Pod{
			meshedIP:   pod("prod", "server", meshedIP.String(), "192.168.0.3", nil),
			plainIP:    pod("prod", "legacy", plainIP.String(), "192.168.0.3", map[string]string{policy.AnnotationInject: "disabled"}),
			skipIP:     pod("prod", "db", skipIP.String(), "192.168.0.4", map[string]string{policy.AnnotationSkipInboundPorts: "5432"}),
			hostNetIP:  hostNet,
			otherNSIP:  pod("optout", "web", otherNSIP.String(), "192.168.0.4", nil),
			clientAddr: pod("prod", "client", clientAddr.String(), "192.168.0.2", nil),
		},
		ns: map[string]*corev1.Namespace{
			"prod":   {ObjectMeta: metav1.ObjectMeta{Name: "prod"}},
			"optout": {ObjectMeta: metav1.ObjectMeta{Name: "optout", Annotations: map[string]string{policy.AnnotationInject: "disabled"}}},
		},
	}
	ep := func(a netip.Addr, port uint16) resolve.Endpoint {
		return resolve.Endpoint{Addr: netip.AddrPortFrom(a, port)}
	}
	d := &Decider{
		Local:   fakeLocal{1: src, 2: &srcSkipOut},
		Cluster: c,
		Services: fakeServices{
			// The unmeshed endpoint comes first: Pick would take it if
			// the decider offered it.
			svcMixed:  {ep(plainIP, 8080), ep(meshedIP, 8080)},
			svcMeshed: {ep(meshedIP, 8080)},
			svcPlain:  {ep(plainIP, 8080), ep(hostNetIP, 8080)},
			svcEmpty:  {},
			svcSkip:   {ep(skipIP, 5432), ep(plainIP, 5432)},
		},
		Synced:      func() bool { return true },
		TrustDomain: "cluster.local",
	}
	return d, c
}

func fl(nic netstack.NICID, dst netip.AddrPort) netstack.Flow {
	return netstack.Flow{NIC: nic, Src: netip.AddrPortFrom(clientAddr, 40000), Dst: dst}
}

func TestDecide(t *testing.T) {
	for _, tc := range []struct {
		name     string
		flow     netstack.Flow
		unsynced bool
		nsErr    error
		verdict  Verdict
		reason   string
		dst      netip.AddrPort // for Mesh
	}{
		{name: "meshed pod", flow: fl(1, netip.AddrPortFrom(meshedIP, 8080)), verdict: Mesh, dst: netip.AddrPortFrom(meshedIP, 8080)},
		{name: "opted-out pod", flow: fl(1, netip.AddrPortFrom(plainIP, 8080)), verdict: Pass, reason: ReasonNotMeshed},
		{name: "pod in opted-out namespace", flow: fl(1, netip.AddrPortFrom(otherNSIP, 80)), verdict: Pass, reason: ReasonNotMeshed},
		{name: "hostNetwork pod", flow: fl(1, netip.AddrPortFrom(hostNetIP, 443)), verdict: Pass, reason: ReasonNotMeshed},
		{name: "not a pod", flow: fl(1, netip.MustParseAddrPort("10.244.9.9:80")), verdict: Pass, reason: ReasonNotMeshed},
		{name: "skip-inbound on destination", flow: fl(1, netip.AddrPortFrom(skipIP, 5432)), verdict: Pass, reason: ReasonSkippedPort},
		{name: "other port of a skipping destination", flow: fl(1, netip.AddrPortFrom(skipIP, 80)), verdict: Mesh, dst: netip.AddrPortFrom(skipIP, 80)},
		{name: "skip-outbound on source", flow: fl(2, netip.MustParseAddrPort("10.244.2.3:3306")), verdict: Pass, reason: ReasonSkippedPort},
		{name: "unknown NIC is held, not passed", flow: fl(9, netip.AddrPortFrom(meshedIP, 8080)), verdict: Hold, reason: ReasonUnknownSrc},
		// Item 1: before sync the view is empty and everything looked unmeshed.
		{name: "not synced: held", flow: fl(1, netip.AddrPortFrom(meshedIP, 8080)), unsynced: true, verdict: Hold, reason: ReasonNotSynced},
		{name: "not synced: unknown peers held too", flow: fl(1, netip.MustParseAddrPort("10.244.9.9:80")), unsynced: true, verdict: Hold, reason: ReasonNotSynced},
		// Item 2: the agent's choice is final.
		{name: "ClusterIP all meshed", flow: fl(1, svcMeshed), verdict: Mesh, dst: netip.AddrPortFrom(meshedIP, 8080)},
		{name: "ClusterIP mixed goes to a meshed endpoint", flow: fl(1, svcMixed), verdict: Mesh, dst: netip.AddrPortFrom(meshedIP, 8080)},
		{name: "ClusterIP none meshed passes", flow: fl(1, svcPlain), verdict: Pass, reason: ReasonNotMeshed},
		{name: "ClusterIP without endpoints refused", flow: fl(1, svcEmpty), verdict: Refuse, reason: ReasonNoEndpoints},
		{name: "ClusterIP whose meshed endpoint skips the port", flow: fl(1, svcSkip), verdict: Pass, reason: ReasonSkippedPort},
		// Smaller hole: a failed namespace lookup is not "no annotations".
		{name: "namespace lookup failure held", flow: fl(1, netip.AddrPortFrom(meshedIP, 8080)), nsErr: errors.New("apiserver down"), verdict: Hold, reason: ReasonLookupFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, c := fixture()
			d.Synced = func() bool { return !tc.unsynced }
			c.nsErr = tc.nsErr
			got := d.Decide(tc.flow)
			if got.Verdict != tc.verdict || got.Reason != tc.reason {
				t.Fatalf("Decide = %s/%q, want %s/%q", got.Verdict, got.Reason, tc.verdict, tc.reason)
			}
			if tc.verdict != Mesh {
				return
			}
			if got.Target.Dst != tc.dst || got.Target.Src == nil || !got.Target.DstNode.IsValid() || got.Target.DstID.ServiceAccount == "" {
				t.Fatalf("target %+v, want dst %s with node and identity", got.Target, tc.dst)
			}
		})
	}
}

func TestDecideSegment(t *testing.T) {
	seg := func(srcPort uint16, dst netip.AddrPort) netstack.Flow {
		return netstack.Flow{NIC: 1, Src: netip.AddrPortFrom(clientAddr, srcPort), Dst: dst}
	}
	for _, tc := range []struct {
		name     string
		flow     netstack.Flow
		srcSkip  string // skip-inbound ports of the local pod
		unsynced bool
		verdict  Verdict
	}{
		// Item 3: after an agent restart, segments of meshed flows.
		{name: "meshed pod to meshed pod", flow: seg(40000, netip.AddrPortFrom(meshedIP, 8080)), verdict: Hold},
		{name: "meshed server's reply to a meshed client", flow: seg(8080, netip.AddrPortFrom(meshedIP, 40000)), verdict: Hold},
		{name: "to a ClusterIP with a meshed endpoint", flow: seg(40000, svcMixed), verdict: Hold},
		{name: "not synced", flow: seg(40000, netip.AddrPortFrom(plainIP, 8080)), unsynced: true, verdict: Hold},
		// What the mesh does not claim keeps working.
		{name: "to an opted-out pod", flow: seg(40000, netip.AddrPortFrom(plainIP, 8080)), verdict: Pass},
		{name: "to a ClusterIP of unmeshed pods", flow: seg(40000, svcPlain), verdict: Pass},
		{name: "to a skipped port of a meshed pod", flow: seg(40000, netip.AddrPortFrom(skipIP, 5432)), verdict: Pass},
		{name: "reply from a skipped inbound port", flow: seg(5432, netip.AddrPortFrom(meshedIP, 40000)), srcSkip: "5432", verdict: Pass},
		{name: "to a node address", flow: seg(40000, netip.MustParseAddrPort("192.168.0.3:10250")), verdict: Pass},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, _ := fixture()
			d.Synced = func() bool { return !tc.unsynced }
			if tc.srcSkip != "" {
				p := *d.Local.(fakeLocal)[1]
				p.Policy.Meshed = true
				var err error
				if p.Policy.SkipInbound, err = policy.ParsePorts(tc.srcSkip); err != nil {
					t.Fatal(err)
				}
				d.Local.(fakeLocal)[1] = &p
			}
			if got := d.DecideSegment(tc.flow); got.Verdict != tc.verdict {
				t.Fatalf("DecideSegment = %s/%q, want %s", got.Verdict, got.Reason, tc.verdict)
			}
		})
	}
}
