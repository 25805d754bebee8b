// Package cniapi is the versioned protocol between the tunmesh-cni plugin and
// the tunmesh node agent: HTTP/1.1 with JSON bodies over a unix socket.
//
// The plugin is the client (see Client), the agent serves an Agent through
// NewHandler on a listener made by Listen. Every request carries the header
// Tunmesh-CNI-Version; the agent refuses versions it does not speak, so the two
// sides may be upgraded independently and still fail loudly instead of
// misunderstanding each other.
//
//	POST /v1/add     AddRequest   -> 200 AddResponse
//	POST /v1/del     DelRequest   -> 204
//	POST /v1/check   CheckRequest -> 204
//	GET  /v1/status               -> 200 StatusResponse
//	POST /v1/gc      GCRequest    -> 204
//
// Failures answer a 4xx/5xx status with an Error body whose Code is a CNI error
// code, which the plugin hands on to the container runtime unchanged.
//
// This package uses the standard library only: the agent and the plugin both
// import it, and the plugin must stay small.
package cniapi

import (
	"fmt"
	"net/netip"
)

// DefaultSocket is where the agent listens unless configured otherwise.
const DefaultSocket = "/var/run/tunmesh/cni.sock"

// Version is the protocol version this package speaks. It is sent in
// VersionHeader on every request and response.
const Version = 1

// VersionHeader carries Version on requests and responses.
const VersionHeader = "Tunmesh-CNI-Version"

// MaxBodySize bounds request and response bodies, in bytes.
const MaxBodySize = 1 << 20

// Request paths.
const (
	PathAdd    = "/v1/add"
	PathDel    = "/v1/del"
	PathCheck  = "/v1/check"
	PathStatus = "/v1/status"
	PathGC     = "/v1/gc"
)

// CNI error codes used in Error.Code. Any other code of the CNI specification
// may be used too; the plugin reports it to the runtime as it is.
const (
	// CodeTryAgainLater tells the runtime to retry the operation later
	// (the agent is starting, busy, or timed out).
	CodeTryAgainLater = 11
	// CodeGeneric is any other failure.
	CodeGeneric = 999
)

// AddRequest hands a new pod to the agent (CNI ADD, after the primary plugin).
type AddRequest struct {
	ContainerID  string `json:"containerID"`
	Netns        string `json:"netns"`  // path of the pod's network namespace
	IfName       string `json:"ifName"` // the pod's primary interface (CNI_IFNAME)
	PodNamespace string `json:"podNamespace"`
	PodName      string `json:"podName"`
	PodUID       string `json:"podUID,omitempty"` // empty when the runtime did not pass K8S_POD_UID
	// IPs are the pod's addresses from the primary plugin's result, with
	// their prefix lengths.
	IPs []netip.Prefix `json:"ips,omitempty"`
}

// AddResponse is the agent's answer to an AddRequest.
type AddResponse struct {
	// Meshed reports whether the agent took the pod into the mesh.
	Meshed bool `json:"meshed"`
	// Reason says why the pod was not meshed (opted out, hostNetwork, ...);
	// empty when Meshed.
	Reason string `json:"reason,omitempty"`
	// Interface is the TUN device the agent created in the pod; set when
	// Meshed, nil otherwise.
	Interface *Interface `json:"interface,omitempty"`
}

// Interface describes a network interface the agent created for a pod.
type Interface struct {
	Name    string `json:"name"`
	Sandbox string `json:"sandbox"` // path of the network namespace it lives in
}

// DelRequest tells the agent that a pod's network is being torn down (CNI DEL).
// Netns may be empty: the runtime need not pass it on DEL.
type DelRequest struct {
	ContainerID  string `json:"containerID"`
	Netns        string `json:"netns,omitempty"`
	IfName       string `json:"ifName"`
	PodNamespace string `json:"podNamespace,omitempty"`
	PodName      string `json:"podName,omitempty"`
}

// CheckRequest asks the agent whether a pod it was handed is still set up as
// it should be (CNI CHECK). The fields mean what they mean in AddRequest.
type CheckRequest struct {
	ContainerID  string         `json:"containerID"`
	Netns        string         `json:"netns"`
	IfName       string         `json:"ifName"`
	PodNamespace string         `json:"podNamespace"`
	PodName      string         `json:"podName"`
	PodUID       string         `json:"podUID,omitempty"`
	IPs          []netip.Prefix `json:"ips,omitempty"`
}

// GCRequest lists the attachments the runtime still uses (CNI GC); the agent
// may release whatever it holds for any other attachment.
type GCRequest struct {
	ValidAttachments []Attachment `json:"validAttachments"`
}

// Attachment names one pod attachment, as CNI does: container ID and the
// pod's interface name.
type Attachment struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
}

// StatusResponse tells whether the agent can take new pods (CNI STATUS).
type StatusResponse struct {
	Ready   bool   `json:"ready"`
	Message string `json:"message,omitempty"` // why not ready, or extra detail
}

// Error is the body of every failed request. An Agent may return an *Error
// (possibly wrapped) to choose the code; any other error is sent as
// CodeGeneric.
type Error struct {
	Code    int    `json:"code"`
	Msg     string `json:"msg"`
	Details string `json:"details,omitempty"`
}

// Errorf returns an *Error with the given CNI code and formatted message.
func Errorf(code int, format string, args ...any) *Error {
	return &Error{Code: code, Msg: fmt.Sprintf(format, args...)}
}

func (e *Error) Error() string {
	if e.Details == "" {
		return fmt.Sprintf("%s (code %d)", e.Msg, e.Code)
	}
	return fmt.Sprintf("%s: %s (code %d)", e.Msg, e.Details, e.Code)
}
