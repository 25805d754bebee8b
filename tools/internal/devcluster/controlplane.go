package devcluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/tunmesh/tunmesh/tools/internal/namedns"
	"github.com/tunmesh/tunmesh/tools/internal/nsproc"
)

// controlPlane is etcd, kube-apiserver and kube-controller-manager, each a
// process in the control-plane namespace. etcd listens on that namespace's
// loopback only; the API server on its underlay address.
type controlPlane struct {
	cfg   Config
	pki   pki
	procs []*named
}

type named struct {
	name string
	*nsproc.Process
}

func (cp *controlPlane) apiURL() string {
	return "https://" + net.JoinHostPort(controlPlaneIP.String(), strconv.Itoa(apiServerPort))
}

func (cp *controlPlane) start(ctx context.Context, progress func(string, ...any)) error {
	cfg := cp.cfg
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(etcdPort)
	progress("starting etcd")
	if err := cp.run("etcd", cfg.Etcd,
		"--name=tunmesh-dev",
		"--data-dir="+cfg.path("etcd"),
		"--listen-client-urls="+etcdURL,
		"--advertise-client-urls="+etcdURL,
		"--listen-peer-urls=http://127.0.0.1:2380",
		"--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=tunmesh-dev=http://127.0.0.1:2380",
		"--quota-backend-bytes=2147483648",
		"--snapshot-count=10000",
		"--log-level=warn",
	); err != nil {
		return err
	}
	if err := cp.waitHTTP(ctx, "etcd", etcdURL+"/health", nil, 30*time.Second); err != nil {
		return err
	}

	progress("starting kube-apiserver")
	issuer := "https://kubernetes.default.svc.cluster.local"
	if err := cp.run("kube-apiserver", filepath.Join(cfg.KubeBinDir, "kube-apiserver"),
		"--etcd-servers="+etcdURL,
		"--bind-address=0.0.0.0",
		"--advertise-address="+controlPlaneIP.String(),
		"--secure-port="+strconv.Itoa(apiServerPort),
		"--tls-cert-file="+cp.pki.apiCert(),
		"--tls-private-key-file="+cp.pki.apiKey(),
		"--client-ca-file="+cp.pki.caCert(),
		"--service-account-key-file="+cp.pki.saPub(),
		"--service-account-signing-key-file="+cp.pki.saKey(),
		"--service-account-issuer="+issuer,
		"--api-audiences="+issuer,
		"--authorization-mode=Node,RBAC",
		"--service-cluster-ip-range="+ServiceCIDR.String(),
		"--allow-privileged=true",
		"--enable-admission-plugins=NodeRestriction",
		// kubectl logs/exec reach real kubelets on their node IP with a
		// client certificate the kubelets' x509 authentication accepts.
		"--kubelet-preferred-address-types=InternalIP",
		"--kubelet-client-certificate="+cp.pki.clientCert(kubeletClientUser),
		"--kubelet-client-key="+cp.pki.clientKey(kubeletClientUser),
		"--profiling=false",
		"--v=0",
	); err != nil {
		return err
	}
	tlsCfg, err := cp.adminTLS()
	if err != nil {
		return err
	}
	if err := cp.waitHTTP(ctx, "kube-apiserver", cp.apiURL()+"/readyz", tlsCfg, 90*time.Second); err != nil {
		return err
	}

	progress("starting kube-controller-manager")
	cmKubeconfig := cfg.path("pki", "controller-manager.kubeconfig")
	if err := cp.pki.writeKubeconfig(cmKubeconfig, cp.apiURL(), controllerManagerUser, ""); err != nil {
		return err
	}
	if err := cp.run("kube-controller-manager", filepath.Join(cfg.KubeBinDir, "kube-controller-manager"),
		"--kubeconfig="+cmKubeconfig,
		"--authentication-kubeconfig="+cmKubeconfig,
		"--authorization-kubeconfig="+cmKubeconfig,
		"--service-account-private-key-file="+cp.pki.saKey(),
		"--root-ca-file="+cp.pki.caCert(),
		"--use-service-account-credentials=true",
		"--controllers=*,-nodeipam",
		"--allocate-node-cidrs=false",
		"--cluster-cidr="+ClusterCIDR.String(),
		"--service-cluster-ip-range="+ServiceCIDR.String(),
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--concurrent-deployment-syncs=5",
		"--v=0",
	); err != nil {
		return err
	}
	if !cfg.RealNodes {
		return nil
	}
	// Real nodes are scheduled by the real kube-scheduler (the stand-in
	// does not run then).
	progress("starting kube-scheduler")
	schedKubeconfig := cfg.path("pki", "scheduler.kubeconfig")
	if err := cp.pki.writeKubeconfig(schedKubeconfig, cp.apiURL(), schedulerUser, ""); err != nil {
		return err
	}
	return cp.run("kube-scheduler", filepath.Join(cfg.KubeBinDir, "kube-scheduler"),
		"--kubeconfig="+schedKubeconfig,
		"--authentication-kubeconfig="+schedKubeconfig,
		"--authorization-kubeconfig="+schedKubeconfig,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--v=0",
	)
}

// run starts one control-plane process with its log under logs/.
func (cp *controlPlane) run(name, path string, args ...string) error {
	p, err := nsproc.Start(nsproc.Spec{
		Netns: cp.cfg.controlPlaneNS(),
		Path:  path,
		Args:  args,
		Log:   cp.cfg.path("logs", name+".log"),
	})
	if err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	cp.procs = append(cp.procs, &named{name: name, Process: p})
	return nil
}

// exited reports the first control-plane process that has died, if any.
func (cp *controlPlane) exited() <-chan string {
	ch := make(chan string, len(cp.procs))
	for _, p := range cp.procs {
		go func() {
			<-p.Done()
			ch <- fmt.Sprintf("%s exited with code %d (log: %s)", p.name, p.ExitCode(), cp.cfg.path("logs", p.name+".log"))
		}()
	}
	return ch
}

// stop stops the processes in reverse order of start.
func (cp *controlPlane) stop() {
	for i := len(cp.procs) - 1; i >= 0; i-- {
		// A graceful API server shutdown can take longer than we want to wait.
		cp.procs[i].Stop(5 * time.Second)
	}
	cp.procs = nil
}

func (cp *controlPlane) adminTLS() (*tls.Config, error) {
	ca, err := os.ReadFile(cp.pki.caCert())
	if err != nil {
		return nil, fmt.Errorf("read ca: %w", err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	cert, err := tls.LoadX509KeyPair(cp.pki.clientCert(adminUser), cp.pki.clientKey(adminUser))
	if err != nil {
		return nil, fmt.Errorf("load admin cert: %w", err)
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

// waitHTTP polls url from inside the control-plane namespace until it
// answers 200, a process dies, or the timeout passes.
func (cp *controlPlane) waitHTTP(ctx context.Context, what, url string, tlsCfg *tls.Config, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ns := cp.cfg.controlPlaneNS()
	client := &http.Client{
		Timeout: 3 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: tlsCfg,
			DialContext:     namedns.Dialer(ns),
		},
	}
	defer client.CloseIdleConnections()
	var last string
	for {
		for _, p := range cp.procs {
			select {
			case <-p.Done():
				return fmt.Errorf("wait for %s: %s exited with code %d (log: %s)", what, p.name, p.ExitCode(), cp.cfg.path("logs", p.name+".log"))
			default:
			}
		}
		resp, err := client.Get(url)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("status %d: %s", resp.StatusCode, strings.TrimSpace(string(body)))
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s at %s: %w (last: %s)", what, url, ctx.Err(), last)
		case <-time.After(250 * time.Millisecond):
		}
	}
}
