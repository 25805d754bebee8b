package installcli

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"
)

// Detected are the cluster CIDRs read from a cluster, and where from.
type Detected struct {
	Pods, Services []netip.Prefix
	// Notes say where each came from and what to watch out for.
	Notes []string
}

// CIDRs returns pods then services, as --cluster-cidrs wants them.
func (d Detected) CIDRs() []netip.Prefix { return append(slices.Clone(d.Pods), d.Services...) }

// String is the clusterCIDRs setting.
func (d Detected) String() string {
	var s []string
	for _, p := range d.CIDRs() {
		s = append(s, p.String())
	}
	return strings.Join(s, ",")
}

// DetectCIDRs reads the pod and Service CIDRs from the cluster:
//
//   - pods: kubeadm's ClusterConfiguration (kube-system/kubeadm-config,
//     networking.podSubnet) when there is one, since it is the whole
//     cluster CIDR; otherwise every Node's spec.podCIDRs, merged where they
//     are adjacent (a node added later with a range outside them is not
//     covered until the setting is updated: Notes says so).
//   - Services: the networking.k8s.io/v1 ServiceCIDR objects; on API
//     servers without them, kubeadm's networking.serviceSubnet.
//
// It fails with ErrNoClusterCIDRs, naming what is missing, when either
// cannot be found.
func DetectCIDRs(ctx context.Context, client kubernetes.Interface) (Detected, error) {
	var d Detected
	kubeadmPods, kubeadmSvcs, err := kubeadmSubnets(ctx, client)
	if err != nil {
		return d, err
	}
	if len(kubeadmPods) > 0 {
		d.Pods = kubeadmPods
		d.Notes = append(d.Notes, "pod CIDRs from kube-system/kubeadm-config (networking.podSubnet)")
	} else {
		nodes, err := client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return d, fmt.Errorf("list nodes: %w", err)
		}
		var per []netip.Prefix
		for _, n := range nodes.Items {
			cidrs := n.Spec.PodCIDRs
			if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
				cidrs = []string{n.Spec.PodCIDR}
			}
			for _, c := range cidrs {
				p, err := netip.ParsePrefix(c)
				if err != nil {
					return d, fmt.Errorf("node %s podCIDR %q: %w", n.Name, c, err)
				}
				per = append(per, p.Masked())
			}
		}
		d.Pods = MergePrefixes(per)
		if len(d.Pods) > 0 {
			d.Notes = append(d.Notes, fmt.Sprintf("pod CIDRs from %d nodes' spec.podCIDRs; nodes added later outside %s need `--set clusterCIDRs=...` and a re-install", len(nodes.Items), join(d.Pods)))
		}
	}
	list, err := client.NetworkingV1().ServiceCIDRs().List(ctx, metav1.ListOptions{})
	switch {
	case err == nil:
		var svc []netip.Prefix
		for _, sc := range list.Items {
			for _, c := range sc.Spec.CIDRs {
				p, err := netip.ParsePrefix(c)
				if err != nil {
					return d, fmt.Errorf("ServiceCIDR %s %q: %w", sc.Name, c, err)
				}
				svc = append(svc, p.Masked())
			}
		}
		d.Services = MergePrefixes(svc)
		if len(d.Services) > 0 {
			d.Notes = append(d.Notes, "Service CIDRs from networking.k8s.io/v1 ServiceCIDR objects")
		}
	case apierrors.IsNotFound(err) || apierrors.IsMethodNotSupported(err):
		// No ServiceCIDR API on this server: kubeadm's value, if any.
	default:
		return d, fmt.Errorf("list ServiceCIDRs: %w", err)
	}
	if len(d.Services) == 0 && len(kubeadmSvcs) > 0 {
		d.Services = kubeadmSvcs
		d.Notes = append(d.Notes, "Service CIDRs from kube-system/kubeadm-config (networking.serviceSubnet)")
	}
	var missing []string
	if len(d.Pods) == 0 {
		missing = append(missing, "pod CIDRs (no node has spec.podCIDRs and there is no kubeadm-config)")
	}
	if len(d.Services) == 0 {
		missing = append(missing, "Service CIDRs (no ServiceCIDR objects and no kubeadm-config)")
	}
	if len(missing) > 0 {
		return d, fmt.Errorf("%w: cannot detect %s; give them with --set clusterCIDRs=POD_CIDR,SERVICE_CIDR", ErrNoClusterCIDRs, strings.Join(missing, " or "))
	}
	return d, nil
}

// kubeadmSubnets reads networking.podSubnet and serviceSubnet from
// kubeadm's ClusterConfiguration; none (and no error) when the ConfigMap is
// absent or not readable by the caller.
func kubeadmSubnets(ctx context.Context, client kubernetes.Interface) (pods, svcs []netip.Prefix, err error) {
	cm, err := client.CoreV1().ConfigMaps("kube-system").Get(ctx, "kubeadm-config", metav1.GetOptions{})
	if apierrors.IsNotFound(err) || apierrors.IsForbidden(err) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read kube-system/kubeadm-config: %w", err)
	}
	var cc struct {
		Networking struct {
			PodSubnet     string `json:"podSubnet"`
			ServiceSubnet string `json:"serviceSubnet"`
		} `json:"networking"`
	}
	if err := yaml.Unmarshal([]byte(cm.Data["ClusterConfiguration"]), &cc); err != nil {
		return nil, nil, fmt.Errorf("kube-system/kubeadm-config ClusterConfiguration: %w", err)
	}
	parse := func(s string) ([]netip.Prefix, error) {
		var out []netip.Prefix
		for c := range strings.SplitSeq(s, ",") {
			if c = strings.TrimSpace(c); c == "" {
				continue
			}
			p, err := netip.ParsePrefix(c)
			if err != nil {
				return nil, fmt.Errorf("kubeadm-config subnet %q: %w", c, err)
			}
			out = append(out, p.Masked())
		}
		return out, nil
	}
	if pods, err = parse(cc.Networking.PodSubnet); err != nil {
		return nil, nil, err
	}
	if svcs, err = parse(cc.Networking.ServiceSubnet); err != nil {
		return nil, nil, err
	}
	return pods, svcs, nil
}

// MergePrefixes returns the smallest list of prefixes covering exactly the
// same addresses: duplicates and prefixes inside others dropped, sibling
// halves joined, sorted (IPv4 first).
func MergePrefixes(in []netip.Prefix) []netip.Prefix {
	ps := slices.Clone(in)
	for {
		slices.SortFunc(ps, func(a, b netip.Prefix) int {
			if c := a.Addr().Compare(b.Addr()); c != 0 {
				return c
			}
			return a.Bits() - b.Bits()
		})
		var out []netip.Prefix
		for _, p := range ps {
			if n := len(out); n > 0 && out[n-1].Contains(p.Addr()) && out[n-1].Bits() <= p.Bits() {
				continue // inside the previous one
			}
			out = append(out, p)
		}
		merged := false
		var next []netip.Prefix
		for i := 0; i < len(out); i++ {
			if i+1 < len(out) && out[i].Bits() == out[i+1].Bits() && out[i].Bits() > 0 {
				parent, err := out[i].Addr().Prefix(out[i].Bits() - 1)
				if err == nil && parent.Addr() == out[i].Addr() && parent.Contains(out[i+1].Addr()) {
					next = append(next, parent)
					i++
					merged = true
					continue
				}
			}
			next = append(next, out[i])
		}
		ps = next
		if !merged {
			return ps
		}
	}
}

func join(ps []netip.Prefix) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.String())
	}
	return strings.Join(s, ",")
}
