package resolve

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

// DialFunc is the signature of net.Dialer.DialContext.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// ServiceFromHost parses a Service host name, "<name>.<namespace>.svc" with
// an optional cluster domain after it. ok is false for anything else.
func ServiceFromHost(host string) (svc types.NamespacedName, ok bool) {
	parts := strings.Split(strings.TrimSuffix(host, "."), ".")
	if len(parts) < 3 || parts[2] != "svc" || parts[0] == "" || parts[1] == "" {
		return types.NamespacedName{}, false
	}
	return types.NamespacedName{Namespace: parts[1], Name: parts[0]}, true
}

// DialContext returns a dial function that reaches Service host names
// ("<name>.<ns>.svc...:<port>") through the Service's endpoints from the
// EndpointSlice informer, so the agent, on the host network, needs neither
// cluster DNS nor kube-proxy (TLS still verifies the name the caller
// configured). It waits (within ctx) for the informers' sync; a Service
// without usable endpoints, and every other address, is dialled by
// fallback as given.
func (r *Resolver) DialContext(fallback DialFunc) DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, portStr, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", addr, err)
		}
		svc, isSvc := ServiceFromHost(host)
		port, perr := strconv.ParseUint(portStr, 10, 16)
		if !isSvc || perr != nil {
			return fallback(ctx, network, addr)
		}
		for !r.Synced() {
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("dial %s: endpoints not synced: %w", addr, ctx.Err())
			case <-time.After(50 * time.Millisecond):
			}
		}
		eps, err := r.ServiceEndpoints(svc, uint16(port))
		if err != nil {
			if errors.Is(err, ErrNoEndpoints) {
				return fallback(ctx, network, addr)
			}
			return nil, err
		}
		var errs []error
		for _, i := range rand.Perm(len(eps)) {
			c, err := fallback(ctx, network, netip.AddrPortFrom(eps[i].Addr.Addr(), eps[i].Addr.Port()).String())
			if err == nil {
				return c, nil
			}
			errs = append(errs, err)
		}
		return nil, fmt.Errorf("dial %s through its endpoints: %w", addr, errors.Join(errs...))
	}
}
