package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/node/authz"
	"github.com/tunmesh/tunmesh/node/clusterview"
	"github.com/tunmesh/tunmesh/node/netpol"
	"github.com/tunmesh/tunmesh/node/policy"
)

type authzOptions struct {
	namespace   string
	pod         string
	from        string // [namespace/]pod
	port        int
	trustDomain string
	controlNS   string
}

func newAuthzCmd(streams genericiooptions.IOStreams) *cobra.Command {
	var o authzOptions
	cmd := &cobra.Command{
		Use:   "authz [-n NAMESPACE] POD [--from [NAMESPACE/]POD] [--port PORT]",
		Short: "Show a pod's effective inbound rules (NetworkPolicy, default inbound policy, Authorizations) and judge a client",
		Long: `authz prints what the tunmesh agents enforce for connections to POD: its
default inbound policy (config.tunmesh.io/default-inbound-policy or the
Linkerd key, on the pod or its namespace), the NetworkPolicies that isolate
it for ingress, and the Authorizations (policy.tunmesh.io) that select it.

With --from, it judges a connection from that client pod to POD's port
(--port, or POD's only container port) with the same evaluation code as the
agents (node/authz): the client's egress policies, then POD's inbound rules
on the client's identity (a meshed client) or as plaintext, and prints each
layer's verdict and the rule that decided. See docs/policy.md.`,
		Args: cobra.ExactArgs(1),
	}
	cf := kubeFlags(cmd)
	cmd.Flags().StringVar(&o.from, "from", "", "client pod, [NAMESPACE/]POD (default namespace: POD's)")
	cmd.Flags().IntVar(&o.port, "port", 0, "destination port (default: POD's only container port)")
	cmd.Flags().StringVar(&o.trustDomain, "trust-domain", "cluster.local", "the mesh's trust domain")
	cmd.Flags().StringVar(&o.controlNS, "control-namespace", defaultControlNamespace, "tunmesh's namespace (never meshed)")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		o.pod = args[0]
		ns, _, err := cf.ToRawKubeConfigLoader().Namespace()
		if err != nil {
			return fmt.Errorf("authz: %w", err)
		}
		o.namespace = ns
		rc, err := cf.ToRESTConfig()
		if err != nil {
			return fmt.Errorf("authz: kubeconfig: %w", err)
		}
		client, err := kubernetes.NewForConfig(rc)
		if err != nil {
			return fmt.Errorf("authz: %w", err)
		}
		dyn, err := dynamic.NewForConfig(rc)
		if err != nil {
			return fmt.Errorf("authz: %w", err)
		}
		return runAuthz(cmd.Context(), client, dyn, o, streams.Out)
	}
	return cmd
}

// clusterSnapshot is authz.Cluster over listed objects.
type clusterSnapshot struct {
	byIP map[netip.Addr]*corev1.Pod
	ns   map[string]*corev1.Namespace
}

func (c *clusterSnapshot) PodByAddr(a netip.Addr) (*corev1.Pod, error) {
	return c.byIP[a.Unmap()], nil
}

func (c *clusterSnapshot) Namespace(name string) (*corev1.Namespace, error) {
	if n, ok := c.ns[name]; ok {
		return n, nil
	}
	return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "namespaces"}, name)
}

// runAuthz lists what the agents read (pods, namespaces, NetworkPolicies,
// Authorizations) and evaluates with their engine.
func runAuthz(ctx context.Context, client kubernetes.Interface, dyn dynamic.Interface, o authzOptions, w io.Writer) error {
	podList, err := client.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("authz: list pods: %w", err)
	}
	nsList, err := client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("authz: list namespaces: %w", err)
	}
	npList, err := client.NetworkingV1().NetworkPolicies("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("authz: list network policies: %w", err)
	}
	var azObjs []*authz.AuthorizationObject
	azList, err := dyn.Resource(authz.GroupVersionResource).Namespace("").List(ctx, metav1.ListOptions{})
	switch {
	case apierrors.IsNotFound(err):
		fmt.Fprintln(w, "warning: the Authorization CRD is not installed (the agents will not sync without it)")
	case err != nil:
		return fmt.Errorf("authz: list authorizations: %w", err)
	default:
		for i := range azList.Items {
			obj, err := authz.FromUnstructured(&azList.Items[i])
			if err != nil {
				fmt.Fprintf(w, "warning: %v (the agents treat it as admitting nothing)\n", err)
				obj = authz.Salvage(&azList.Items[i]) // as the agents do: its pod selector still restricts
			}
			azObjs = append(azObjs, obj)
		}
	}

	snap := &clusterSnapshot{byIP: map[netip.Addr]*corev1.Pod{}, ns: map[string]*corev1.Namespace{}}
	var dst, src *corev1.Pod
	srcNS, srcName := o.namespace, o.from
	if i := strings.IndexByte(o.from, '/'); i >= 0 {
		srcNS, srcName = o.from[:i], o.from[i+1:]
	}
	var live []*corev1.Pod
	for i := range podList.Items {
		p := &podList.Items[i]
		if p.Namespace == o.namespace && p.Name == o.pod {
			dst = p
		}
		if o.from != "" && p.Namespace == srcNS && p.Name == srcName {
			src = p
		}
		if !p.Spec.HostNetwork && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
			live = append(live, p)
		}
	}
	// As the agents' view does: the pod that holds an IP now.
	groups := map[netip.Addr][]*corev1.Pod{}
	for _, p := range live {
		for _, ip := range p.Status.PodIPs {
			if a, err := netip.ParseAddr(ip.IP); err == nil {
				groups[a] = append(groups[a], p)
			}
		}
	}
	for a, ps := range groups {
		if h := clusterview.Holder(ps); h != nil {
			snap.byIP[a] = h
		}
	}
	nsLabels := map[string]map[string]string{}
	for i := range nsList.Items {
		n := &nsList.Items[i]
		snap.ns[n.Name] = n
		nsLabels[n.Name] = n.Labels
	}
	if dst == nil {
		return fmt.Errorf("authz: pod %s/%s not found", o.namespace, o.pod)
	}
	if o.from != "" && src == nil {
		return fmt.Errorf("authz: client pod %s/%s not found", srcNS, srcName)
	}
	nps := make([]*networkingv1.NetworkPolicy, 0, len(npList.Items))
	for i := range npList.Items {
		nps = append(nps, &npList.Items[i])
	}
	policies, err := netpol.NewSnapshot(nps, nsLabels)
	if err != nil {
		fmt.Fprintf(w, "warning: %v (invalid parts match nothing)\n", err)
	}
	idx, err := authz.NewIndex(azObjs)
	if err != nil {
		fmt.Fprintf(w, "warning: %v\n", err)
	}
	pcfg := policy.Config{ExcludedNamespaces: []string{"kube-system", o.controlNS}}
	eng, err := authz.New(snap, policies, idx, pcfg, o.trustDomain)
	if err != nil {
		return fmt.Errorf("authz: %w", err)
	}

	dstPol, _ := pcfg.For(dst, snap.ns[dst.Namespace]) // annotation errors show as the default inbound policy's source
	id := spiffe.ID{TrustDomain: o.trustDomain, Namespace: dst.Namespace, ServiceAccount: clusterview.ServiceAccount(dst)}
	fmt.Fprintf(w, "pod %s/%s  ip %s  identity %s\n", dst.Namespace, dst.Name, dst.Status.PodIP, id)
	if !dstPol.Meshed {
		fmt.Fprintf(w, "not meshed (%s): tunmesh enforces nothing for it; its NetworkPolicies are the primary CNI's\n", dstPol.Reason)
		return nil
	}
	di, diSrc, err := eng.DefaultInbound(dst)
	if err != nil {
		return fmt.Errorf("authz: %w", err)
	}
	fmt.Fprintf(w, "default inbound policy: %s (%s)\n", di, diSrc)
	isolating, selecting := eng.IngressPolicies(dst, policies)
	if len(isolating) == 0 {
		fmt.Fprintln(w, "networkpolicy ingress: not isolated (no NetworkPolicy of type Ingress selects it)")
	} else {
		fmt.Fprintf(w, "networkpolicy ingress: isolated by %s; allowed: what one of their ingress rules matches\n", strings.Join(isolating, ", "))
		for _, np := range nps {
			if np.Namespace == dst.Namespace && contains(isolating, np.Namespace+"/"+np.Name) {
				for i, r := range np.Spec.Ingress {
					fmt.Fprintf(w, "  %s/%s rule %d: %s\n", np.Namespace, np.Name, i, describeIngressRule(r))
				}
			}
		}
	}
	if len(selecting) == 0 {
		fmt.Fprintln(w, "authorizations: none select it (the default inbound policy decides)")
	} else {
		fmt.Fprintf(w, "authorizations: %s select it: only the identities they admit, on their ports; plaintext refused\n", strings.Join(selecting, ", "))
		for _, a := range azObjs {
			if a.Namespace == dst.Namespace && contains(selecting, a.Namespace+"/"+a.Name) {
				fmt.Fprintf(w, "  %s/%s: %s\n", a.Namespace, a.Name, describeAuthorization(a))
			}
		}
	}
	if src == nil {
		return nil
	}

	port := o.port
	if port == 0 {
		var ports []int32
		for _, c := range slices.Concat(dst.Spec.InitContainers, dst.Spec.Containers) { // sidecars are init containers
			for _, p := range c.Ports {
				if p.Protocol == "" || p.Protocol == corev1.ProtocolTCP {
					ports = append(ports, p.ContainerPort)
				}
			}
		}
		if len(ports) != 1 {
			return usageError{fmt.Errorf("authz: pod %s/%s has %d TCP container ports: name one with --port", dst.Namespace, dst.Name, len(ports))}
		}
		port = int(ports[0])
	}
	if port < 1 || port > 65535 {
		return usageError{fmt.Errorf("authz: --port %d out of range", port)}
	}
	dstIP, err := netip.ParseAddr(dst.Status.PodIP)
	if err != nil {
		return fmt.Errorf("authz: pod %s/%s has no IP yet", dst.Namespace, dst.Name)
	}
	srcPol, _ := pcfg.For(src, snap.ns[src.Namespace])
	srcID := spiffe.ID{TrustDomain: o.trustDomain, Namespace: src.Namespace, ServiceAccount: clusterview.ServiceAccount(src)}
	var d authz.Decision
	if srcPol.Meshed && !srcPol.SkipsOutbound(uint16(port)) && !dstPol.SkipsInbound(uint16(port)) {
		fmt.Fprintf(w, "\nfrom %s/%s (meshed, identity %s) to port %d:\n", src.Namespace, src.Name, srcID, port)
		d = eng.Outbound(src, authz.PodAddr(src, dstIP), srcID, netip.AddrPortFrom(dstIP, uint16(port)), dst)
	} else {
		fmt.Fprintf(w, "\nfrom %s/%s (plaintext) to port %d:\n", src.Namespace, src.Name, port)
		srcIP, _ := netip.ParseAddr(src.Status.PodIP)
		if dstPol.SkipsInbound(uint16(port)) {
			d = eng.PlaintextNetworkPolicy(dst, uint16(port), srcIP)
		} else {
			d = eng.Inbound(authz.Client{IP: srcIP, Pod: src}, dst, uint16(port))
		}
		fmt.Fprintln(w, "  (the client's egress is the primary CNI's to enforce: tunmesh does not carry plaintext)")
	}
	for _, s := range d.Steps {
		fmt.Fprintf(w, "  %s\n", s)
	}
	verdict := "ALLOWED"
	if !d.Allowed {
		verdict = "DENIED"
	}
	fmt.Fprintf(w, "%s (%s %s, %s %s)\n", verdict, d.Direction, d.Kind, d.Policy, d.Reason)
	return nil
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func describeIngressRule(r networkingv1.NetworkPolicyIngressRule) string {
	var from, ports []string
	for _, p := range r.From {
		var parts []string
		if p.IPBlock != nil {
			parts = append(parts, "ipBlock "+p.IPBlock.CIDR)
			if len(p.IPBlock.Except) > 0 {
				parts = append(parts, "except "+strings.Join(p.IPBlock.Except, ","))
			}
		}
		if p.NamespaceSelector != nil {
			parts = append(parts, "namespaces "+selectorString(p.NamespaceSelector))
		}
		if p.PodSelector != nil {
			parts = append(parts, "pods "+selectorString(p.PodSelector))
		}
		from = append(from, strings.Join(parts, " "))
	}
	for _, p := range r.Ports {
		proto := "TCP"
		if p.Protocol != nil {
			proto = string(*p.Protocol)
		}
		s := proto
		if p.Port != nil {
			s += "/" + p.Port.String()
		}
		if p.EndPort != nil {
			s += fmt.Sprintf("-%d", *p.EndPort)
		}
		ports = append(ports, s)
	}
	f, pt := "from anywhere", "any port"
	if len(from) > 0 {
		f = "from [" + strings.Join(from, "; ") + "]"
	}
	if len(ports) > 0 {
		pt = "ports " + strings.Join(ports, ",")
	}
	return f + ", " + pt
}

func selectorString(s *metav1.LabelSelector) string {
	sel, err := metav1.LabelSelectorAsSelector(s)
	if err != nil {
		return "<invalid>"
	}
	if sel.Empty() {
		return "{all}"
	}
	return "{" + sel.String() + "}"
}

func describeAuthorization(a *authz.AuthorizationObject) string {
	var from, ports []string
	for _, f := range a.Spec.From {
		switch {
		case f.ServiceAccount != nil:
			ns := f.ServiceAccount.Namespace
			if ns == "" {
				ns = a.Namespace
			}
			from = append(from, "serviceAccount "+ns+"/"+f.ServiceAccount.Name)
		case f.Namespace != "":
			from = append(from, "namespace "+f.Namespace)
		case f.SPIFFEID != "":
			from = append(from, f.SPIFFEID)
		}
	}
	for _, p := range a.Spec.Ports {
		s := p.Port.String()
		if p.EndPort != nil {
			s += fmt.Sprintf("-%d", *p.EndPort)
		}
		ports = append(ports, s)
	}
	pt := "any port"
	if len(ports) > 0 {
		pt = "ports " + strings.Join(ports, ",")
	}
	if len(from) == 0 {
		return "invalid: admits nothing"
	}
	return "pods " + selectorString(&a.Spec.PodSelector) + ", " + pt + ", from " + strings.Join(from, ", ")
}
